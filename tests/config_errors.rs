//! Every class of bad service file: its message (file, line, column, key) and exit 78,
//! through the real binary, for `check` and for `run`.

mod support;

use std::path::Path;
use std::process::Command;

use support::BIN;

fn check(dir: &Path, text: &str, extra: &[&str]) -> (i32, String) {
    let file = dir.join("svc.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .arg("--config-dir")
        .arg(dir)
        .arg("check")
        .arg("--config")
        .arg(&file)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (what, file text, the whole of stderr with `@` for the file's path). Golden: each
/// class of mistake has exactly this message, its position, caret and hint.
const STATIC_CASES: &[(&str, &str, &str)] = &[
    (
        "malformed TOML",
        "service_dir = \"/x\nboot = true\n",
        "error: @:1:18: service_dir: invalid basic string, expected `\"`
   1 | service_dir = \"/x
     |                  ^
",
    ),
    (
        "unknown key",
        "service_dir = \"/x\"\nbot = true\n",
        "error: @:2:1: bot: unknown field `bot`, expected one of `name`, `service_dir`, `image`, `image_url`, `boot`, `hostname`, `binds`, `env_file`, `env`, `network`, `overlay`, `apptainer`, `readiness`, `timeouts`, `unit`, `install`, `security`, `update`
   2 | bot = true
     | ^
",
    ),
    (
        "wrong type",
        "service_dir = \"/x\"\nboot = \"yes\"\n",
        "error: @:2:8: boot: invalid type: string \"yes\", expected a boolean
   2 | boot = \"yes\"
     |        ^
",
    ),
    (
        "relative bind source",
        "service_dir = \"/x\"\nbinds = [\"data:/data\"]\n",
        "error: @:2:10: binds: \"data:/data\": the source is not an absolute path
   2 | binds = [\"data:/data\"]
     |          ^
  hint: bind sources are host paths; write them in full, or use ${service_dir}/…
",
    ),
    (
        "bind source still relative after substitution",
        "name = \"svc\"\nservice_dir = \"/x\"\nbinds = [\"${name}/data:/data\"]\n",
        "error: @:3:10: binds: \"svc/data:/data\": the source is not an absolute path
   3 | binds = [\"${name}/data:/data\"]
     |          ^
  hint: bind sources are host paths; write them in full, or use ${service_dir}/…
",
    ),
    (
        "relative bind target",
        "service_dir = \"/x\"\nbinds = [\"${service_dir}/data:data\"]\n",
        "error: @:2:10: binds: \"/x/data:data\": the destination is not an absolute path
   2 | binds = [\"${service_dir}/data:data\"]
     |          ^
",
    ),
    (
        "duplicate mount target",
        "service_dir = \"/x\"\nbinds = [\"/a:/d\", \"/b:/d\"]\n",
        "error: @:2:19: binds: \"/b:/d\" is mounted at /d already (line 2)
   2 | binds = [\"/a:/d\", \"/b:/d\"]
     |                   ^
  hint: each container path may be the target of one bind
",
    ),
    (
        "duplicate mount target, implicit and spelled differently",
        "service_dir = \"/x\"\nbinds = [\n  \"/data\",\n  \"/srv/data:/data/:ro\",\n]\n",
        "error: @:4:3: binds: \"/srv/data:/data/:ro\" is mounted at /data already (line 3)
   4 |   \"/srv/data:/data/:ro\",
     |   ^
  hint: each container path may be the target of one bind
",
    ),
    (
        "bind onto the container's root",
        "service_dir = \"/x\"\nbinds = [\"/srv:/\"]\n",
        "error: @:2:10: binds: \"/srv:/\": the target is the container's root, where the image and overlay are
   2 | binds = [\"/srv:/\"]
     |          ^
",
    ),
    (
        "traversal in the name",
        "name = \"../x\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: \"../x\" contains '/'; names allow only ASCII letters, digits, '.', '_' and '-'
   1 | name = \"../x\"
     |        ^
",
    ),
    (
        "slash in the name",
        "name = \"x/y\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: \"x/y\" contains '/'; names allow only ASCII letters, digits, '.', '_' and '-'
   1 | name = \"x/y\"
     |        ^
",
    ),
    (
        "space in the name",
        "name = \"a b\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: \"a b\" contains ' '; names allow only ASCII letters, digits, '.', '_' and '-'
   1 | name = \"a b\"
     |        ^
",
    ),
    (
        "leading dot in the name",
        "name = \".x\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: \".x\" starts with \".\"; a name must start with a letter, a digit or '_'
   1 | name = \".x\"
     |        ^
",
    ),
    (
        "leading dash in the name",
        "name = \"-x\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: \"-x\" starts with \"-\"; a name must start with a letter, a digit or '_'
   1 | name = \"-x\"
     |        ^
",
    ),
    (
        "empty name",
        "name = \"\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: is empty
   1 | name = \"\"
     |        ^
",
    ),
    (
        "name too long",
        "name = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\" is 65 characters long; the limit is 64 (the host name a booted instance gets)
   1 | name = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"
     |        ^
",
    ),
    (
        "non-ASCII name",
        "name = \"café\"\nservice_dir = \"/x\"\n",
        "error: @:1:8: name: \"café\" contains 'é'; names allow only ASCII letters, digits, '.', '_' and '-'
   1 | name = \"café\"
     |        ^
",
    ),
    (
        "network name that is a hidden file",
        "service_dir = \"/x\"\n[[network]]\nname = \".n\"\nexternal = true\n",
        "error: @:3:8: network.name: \".n\" starts with \".\"; a name must start with a letter, a digit or '_'
   3 | name = \".n\"
     |        ^
",
    ),
    (
        "missing service_dir",
        "name = \"x\"\n",
        "error: @:1:1: service_dir: missing field `service_dir`
   1 | name = \"x\"
     | ^
",
    ),
    (
        "overlay too small",
        "service_dir = \"/x\"\n[overlay]\nsize_mib = 10\n",
        "error: @:3:12: overlay.size_mib: 10 MiB is below Apptainer's minimum of 64 MiB
   3 | size_mib = 10
     |            ^
",
    ),
    (
        "network without a name",
        "service_dir = \"/x\"\n[[network]]\nargs = []\n",
        "error: @:2:1: network.name: missing field `name`
   2 | [[network]]
     | ^
",
    ),
    (
        "unknown network key",
        "service_dir = \"/x\"\n[[network]]\nname = \"n\"\nparent = \"eth0\"\n",
        "error: @:4:1: network.parent: unknown field `parent`, expected one of `name`, `args`, `type`, `master`, `mode`, `bridge`, `mtu`, `mac`, `external`, `manage`, `ipam`
   4 | parent = \"eth0\"
     | ^
",
    ),
];

#[test]
fn static_config_errors_name_file_line_key_and_exit_78() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("svc.toml");
    for (what, text, want) in STATIC_CASES {
        let (code, err) = check(d.path(), text, &[]);
        assert_eq!(code, 78, "{what}: {err}");
        let want = want.replace('@', &file.display().to_string());
        assert_eq!(err, want, "{what}");
    }
}

#[test]
fn host_errors_need_host_flag_and_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let text = "service_dir = \"/nonexistent/svc\"\nbinds = [\"/nonexistent/src:/dst\"]\n[apptainer]\nbinary = \"/bin/true\"\n";
    let (code, _) = check(d.path(), text, &[]);
    assert_eq!(code, 0, "static check passes on any machine");
    let (code, err) = check(d.path(), text, &["--host"]);
    assert_eq!(code, 78);
    let file = d.path().join("svc.toml");
    for want in [
        format!("{}: image (default): image /nonexistent/svc/containers/container.sif does not exist", file.display()),
        format!("{}:2:10: binds: bind source /nonexistent/src does not exist on this host", file.display()),
        format!("{}: overlay.path (default): the overlay is missing and its directory /nonexistent/svc/overlay does not exist", file.display()),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn two_services_claiming_one_overlay_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let svc = d.path().join("svc");
    std::fs::create_dir_all(svc.join("containers")).unwrap();
    std::fs::create_dir_all(svc.join("overlay")).unwrap();
    std::fs::write(svc.join("containers/container.sif"), b"").unwrap();
    let text = format!(
        "service_dir = \"{}\"\n[apptainer]\nbinary = \"/bin/true\"\n",
        svc.display()
    );
    std::fs::write(d.path().join("other.toml"), &text).unwrap();
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("is also the overlay of service other"),
        "{err}"
    );
}

#[test]
fn bad_env_file_line_is_named() {
    let d = tempfile::tempdir().unwrap();
    let env = d.path().join("env");
    std::fs::write(&env, "A=1\nrm -rf /\n").unwrap();
    let text = format!(
        "service_dir = \"/x\"\nimage = \"/bin/true\"\nenv_file = \"{}\"\n[apptainer]\nbinary = \"/bin/true\"\n",
        env.display()
    );
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78);
    assert!(
        err.contains(&format!(
            "{}:2: \"rm -rf /\" is not KEY=VALUE",
            env.display()
        )),
        "{err}"
    );
}

/// A NUL (or another control character but TAB) in the env file is a config error naming
/// file:line, for `check --host` and for `run` alike (exit 78; `run` used to fail later,
/// with 71, when the value could not reach Apptainer's environment).
#[test]
fn control_characters_in_the_env_file_are_refused_with_file_and_line() {
    if !support::require_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let env = d.path().join("svc.env");
    std::fs::write(&env, "SITE=prod\nTOKEN=ab\0cd\n").unwrap();
    let text = host_ready(d.path(), &format!("env_file = \"{}\"\n", env.display()));
    let want = format!(
        "{}:2: contains the control character U+0000; the env file holds text only (TAB is the one allowed)",
        env.display()
    );
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains(&want), "{err}");
    let out = Command::new(BIN)
        .arg("--config-dir")
        .arg(d.path())
        .args(["run", "svc", "--run-dir"])
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains(&want), "{err}");
    assert!(
        !d.path().join("run").exists(),
        "nothing made for a bad env file"
    );
}

/// An env file that is a FIFO (or a device) is refused, not read: a writer on the other
/// end could feed `run` for ever.
#[test]
fn an_env_file_that_is_not_a_regular_file_is_refused() {
    if !support::require_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let env = d.path().join("svc.env");
    nix::unistd::mkfifo(&env, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let text = host_ready(d.path(), &format!("env_file = \"{}\"\n", env.display()));
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!("{}", env.display())) && err.contains("not a regular file"),
        "{err}"
    );
}

#[test]
fn run_refuses_bad_config_with_78_before_doing_anything() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("bad.toml"), "service_dir = 3\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "--config-dir",
            d.path().to_str().unwrap(),
            "run",
            "bad",
            "--run-dir",
        ])
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        !d.path().join("run").exists(),
        "no lock or run dir made for a bad config"
    );
    let out = Command::new(BIN)
        .args([
            "--config-dir",
            d.path().to_str().unwrap(),
            "run",
            "../etc/passwd",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contains '/'"));
}

#[test]
fn shipped_examples_pass_the_static_check() {
    for name in ["ood001", "login005", "login007", "ood-ha001", "ww001"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.toml"));
        let out = Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(plan["name"], name);
        assert_eq!(plan["argv"].as_array().unwrap().last().unwrap(), name);
    }
}

/// Every shipped example binds all of /shared, which holds every service's directory, env
/// file and overlay: `check` (static, and --json) warns, naming the bind with its line, each
/// service whose files it exposes, and the narrower bind.
#[test]
fn shipped_examples_warn_that_binding_all_of_shared_exposes_service_files() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let names = ["ood001", "login005", "login007", "ood-ha001", "ww001"];
    for name in names {
        let out = Command::new(BIN)
            .arg("--config-dir")
            .arg(&examples)
            .args(["check", name])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = examples.join(format!("{name}.toml"));
        let line = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .position(|l| l.trim() == "\"/shared\",")
            .unwrap()
            + 1;
        let warning = text
            .lines()
            .find(|l| l.starts_with("warning: ") && l.contains("binds: bind"))
            .unwrap_or_else(|| panic!("{name}: no bind warning in\n{text}"));
        assert!(
            warning.starts_with(&format!(
                "warning: {}:{line}:3: binds: bind \"/shared\" exposes service files to the container: this service ({name}): service directory /shared/services/",
                file.display()
            )),
            "{warning}"
        );
        for other in names.iter().filter(|o| **o != name) {
            assert!(
                warning.contains(&format!(
                    "; service {other}: service directory /shared/services/"
                )),
                "{name} names {other}: {warning}"
            );
        }
        assert!(
            warning.ends_with("root inside it could rewrite an env file that the next start of that service reads as host root, or its overlay"),
            "{warning}"
        );
        assert!(
            text.contains("\n  hint: bind only what the container needs below /shared, leaving out /shared/services\n"),
            "{text}"
        );
        let out = Command::new(BIN)
            .arg("--config-dir")
            .arg(&examples)
            .args(["check", name, "--json"])
            .output()
            .unwrap();
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            plan["warnings"].as_array().unwrap().iter().any(|w| w
                .as_str()
                .unwrap()
                .contains("binds: bind \"/shared\" exposes service files")),
            "{plan}"
        );
    }
}

#[test]
fn service_file_writable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("svc.toml");
    std::fs::write(&file, "service_dir = \"/x\"\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(BIN)
        .arg("--config-dir")
        .arg(d.path())
        .args(["check", "--host", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!(
            "{}: service file is writable by group or others (mode 0666)",
            file.display()
        )),
        "{err}"
    );
    assert!(err.contains("hint: chmod go-w"), "{err}");
}

/// A service whose image, overlay directory and apptainer binary exist, so that a host check
/// reports only what the case adds. Returns the service file's text.
fn host_ready(dir: &Path, extra: &str) -> String {
    let svc = dir.join("svc");
    std::fs::create_dir_all(svc.join("containers")).unwrap();
    std::fs::create_dir_all(svc.join("overlay")).unwrap();
    std::fs::write(svc.join("containers/container.sif"), b"").unwrap();
    format!(
        "service_dir = \"{}\"\n{extra}[apptainer]\nbinary = \"/bin/true\"\n",
        svc.display()
    )
}

#[test]
fn missing_bind_source_is_its_own_error_with_file_line_column_and_key() {
    let d = tempfile::tempdir().unwrap();
    let text = host_ready(
        d.path(),
        "binds = [\n  \"/shared\",\n  \"/nonexistent/src:/dst:ro\",\n]\n",
    );
    // A bind that exists and holds no service file: only the missing one is reported.
    std::fs::create_dir(d.path().join("data")).unwrap();
    let text = text.replace("/shared", d.path().join("data").to_str().unwrap());
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    assert_eq!(
        err,
        format!(
            "error: {}:4:3: binds: bind source /nonexistent/src does not exist on this host (bind \"/nonexistent/src:/dst:ro\")\n  hint: create it, or remove the bind\n",
            d.path().join("svc.toml").display()
        )
    );
}

#[test]
fn service_file_not_owned_by_root_is_refused() {
    if !support::require_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let text = host_ready(d.path(), "");
    let file = d.path().join("svc.toml");
    std::fs::write(&file, &text).unwrap();
    std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
    let out = Command::new(BIN)
        .arg("--config-dir")
        .arg(d.path())
        .args(["check", "--host", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert_eq!(
        err,
        format!(
            "error: {f}: service file is owned by uid 65534, not root: it decides what runs as root\n  hint: chown root {f}, or list 65534 in [security] trusted_owners if the file server shows root's files as 65534\n",
            f = file.display()
        )
    );
    // The documented way for root_squash NFS: trust that uid, never switch the check off.
    std::fs::write(
        &file,
        text.replace(
            "[apptainer]",
            "[security]\ntrusted_owners = [65534]\n[apptainer]",
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config-dir")
        .arg(d.path())
        .args(["check", "--host", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// sshd's StrictModes for what decides what root runs, up to `/`: a world-writable directory
/// above the env file (even sticky, as /tmp is) or the overlay is refused, each offender
/// listed at once with its fix.
#[test]
fn world_writable_directories_above_are_all_refused_with_their_fix() {
    let d = tempfile::tempdir().unwrap();
    let text = host_ready(d.path(), "");
    let svc = d.path().join("svc");
    std::fs::create_dir(svc.join("bin")).unwrap();
    std::fs::write(svc.join("bin/.service_env"), "A=1\n").unwrap();
    chmod(&svc.join("bin"), 0o1777);
    chmod(&svc.join("overlay"), 0o777);
    chmod(&svc.join("containers"), 0o775);
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    // What would only be warned about is listed with them, so one run shows every offender.
    assert!(
        err.contains(&format!(
            "\nwarning: {p}: directory above the image is writable by its group (mode 0775)",
            p = svc.join("containers").display()
        )),
        "{err}"
    );
    for (dir, what) in [("bin", "env file"), ("overlay", "overlay")] {
        let p = svc.join(dir);
        assert!(
            err.contains(&format!(
                "{p}: directory above the {what} is writable by others (mode {mode}): whoever can write it can change what runs as root\n  hint: chmod o-w {p}\n",
                p = p.display(),
                mode = if dir == "bin" { "1777" } else { "0777" },
            )),
            "{err}"
        );
    }
}

/// What is newly checked and only group-writable or owned by an untrusted uid is a warning
/// (`check --host` text and JSON) for now, refused with `[security] strict_paths = true`;
/// a uid in `trusted_owners` is no offender.
#[test]
fn group_writable_or_foreign_owned_above_warns_now_and_strict_paths_refuses() {
    if !support::require_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let text = host_ready(d.path(), "");
    let svc = d.path().join("svc");
    chmod(&svc, 0o775);
    std::os::unix::fs::chown(svc.join("containers"), Some(65534), None).unwrap();
    let group = format!(
        "{p}: directory above the env file, the image and the overlay is writable by its group (mode 0775): whoever can write it can change what runs as root\n  hint: chmod g-w {p}",
        p = svc.display()
    );
    let owner = format!(
        "{p}: directory above the image is owned by uid 65534, neither root nor a trusted owner: whoever can write it can change what runs as root\n  hint: chown root {p}",
        p = svc.join("containers").display()
    );
    let file = d.path().join("svc.toml");
    let run = |text: &str, json: bool| {
        std::fs::write(&file, text).unwrap();
        let mut c = Command::new(BIN);
        c.arg("--config-dir")
            .arg(d.path())
            .args(["check", "--host", "--config"])
            .arg(&file);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let out = run(&text, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("warning: {group}")), "{stdout}");
    assert!(stdout.contains(&format!("warning: {owner}")), "{stdout}");
    assert!(
        stdout.contains("refused with [security] strict_paths = true"),
        "{stdout}"
    );
    let out = run(&text, true);
    assert_eq!(out.status.code(), Some(0));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings: Vec<&str> = plan["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with(&group), "{warnings:?}");
    assert!(warnings[1].starts_with(&owner), "{warnings:?}");

    let strict = text.replace(
        "[apptainer]",
        "[security]\nstrict_paths = true\n[apptainer]",
    );
    let out = run(&strict, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains(&group) && err.contains(&owner), "{err}");

    let trusted = text.replace(
        "[apptainer]",
        "[security]\ntrusted_owners = [65534]\n[apptainer]",
    );
    let out = run(&trusted, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains(&group) && !stdout.contains("uid 65534"),
        "{stdout}"
    );
}

/// A missing overlay is never created in a directory others may write (Apptainer's creation
/// follows links): `check --host` says so before `run` meets it.
#[test]
fn a_missing_overlay_in_a_group_writable_directory_is_refused_by_check() {
    let d = tempfile::tempdir().unwrap();
    let text = host_ready(d.path(), "");
    let dir = d.path().join("svc/overlay");
    chmod(&dir, 0o775);
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!(
            "overlay.path (default): the overlay is missing and cannot be created: the overlay's directory {p} is writable by group or others (mode 0775): whoever can write it could redirect Apptainer's creation (it follows links)\n  hint: chmod go-w {p}, or create the overlay by hand",
            p = dir.display()
        )),
        "{err}"
    );
}

/// An env file that is itself a symbolic link (here to another root-owned file) is refused;
/// one reached through a symlinked directory is read where it really is.
#[test]
fn symlinked_env_file_is_refused_and_a_symlinked_directory_is_not() {
    let d = tempfile::tempdir().unwrap();
    let real = d.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("env"), "A=1\n").unwrap();
    std::os::unix::fs::symlink(real.join("env"), real.join("link")).unwrap();
    std::os::unix::fs::symlink(&real, d.path().join("dirlink")).unwrap();
    let text = host_ready(
        d.path(),
        &format!("env_file = \"{}\"\n", real.join("link").display()),
    );
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!(
            "env file: {} is a symbolic link: a file that decides what root runs is read only where it is, never through a link",
            real.join("link").display()
        )),
        "{err}"
    );
    let text = host_ready(
        d.path(),
        &format!(
            "env_file = \"{}\"\n",
            d.path().join("dirlink/env").display()
        ),
    );
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 0, "{err}");
}

/// HOME or APPTAINER_CONFIGDIR in the env file or `[env]` would reach the Apptainer CLI only
/// and move its instance state file away from where the supervisor (and `apptainer instance
/// list` run by an operator) look: refused with file:line: key, exit 78.
#[test]
fn env_file_and_env_may_not_move_apptainers_state() {
    let d = tempfile::tempdir().unwrap();
    let env = d.path().join("svc.env");
    std::fs::write(
        &env,
        "SITE=prod\nexport APPTAINER_CONFIGDIR=/srv/elsewhere\nHOME=/srv\n",
    )
    .unwrap();
    let text = host_ready(d.path(), &format!("env_file = \"{}\"\n", env.display()));
    let (code, err) = check(d.path(), &text, &["--host"]);
    assert_eq!(code, 78, "{err}");
    for (line, key) in [(2, "APPTAINER_CONFIGDIR"), (3, "HOME")] {
        assert!(
            err.contains(&format!(
                "{}:{line}: {key}: {key} would move Apptainer's instance state",
                env.display()
            )),
            "{err}"
        );
    }
    assert!(err.contains("hint: remove it"), "{err}");
    assert!(!err.contains("SITE"), "{err}");

    for key in ["HOME", "SINGULARITY_CONFIGDIR"] {
        let text = host_ready(
            d.path(),
            &format!("[env]\nSITE = \"x\"\n{key} = \"/srv\"\n"),
        );
        let (code, err) = check(d.path(), &text, &[]);
        assert_eq!(code, 78, "{err}");
        assert!(
            err.contains(&format!(
                "{}:4:1: env: {key} would move Apptainer's instance state",
                d.path().join("svc.toml").display()
            )),
            "{err}"
        );
    }
}
