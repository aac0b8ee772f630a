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
        "error: @:2:1: bot: unknown field `bot`, expected one of `name`, `service_dir`, `image`, `image_url`, `boot`, `hostname`, `binds`, `env_file`, `env`, `network`, `overlay`, `apptainer`, `readiness`, `timeouts`, `unit`, `install`, `security`
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
    let text = text.replace("/shared", d.path().to_str().unwrap());
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
            "error: {f}: service file is owned by uid 65534, not root: it decides what runs as root\n  hint: chown root {f}\n",
            f = file.display()
        )
    );
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
