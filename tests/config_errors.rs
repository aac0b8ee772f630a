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

/// (what, file text, expected start of the message after "error: <file>:")
const STATIC_CASES: &[(&str, &str, &str)] = &[
    (
        "malformed TOML",
        "service_dir = \"/x\nboot = true\n",
        "1:18: service_dir: invalid basic string",
    ),
    (
        "unknown key",
        "service_dir = \"/x\"\nbot = true\n",
        "2:1: bot: unknown field `bot`",
    ),
    (
        "wrong type",
        "service_dir = \"/x\"\nboot = \"yes\"\n",
        "2:8: boot: invalid type: string \"yes\", expected a boolean",
    ),
    (
        "relative bind",
        "service_dir = \"/x\"\nbinds = [\"data:/data\"]\n",
        "2:10: binds: \"data:/data\": the source is not an absolute path",
    ),
    (
        "duplicate mount target",
        "service_dir = \"/x\"\nbinds = [\"/a:/d\", \"/b:/d\"]\n",
        "2:19: binds: \"/b:/d\" is mounted at /d already (line 2)",
    ),
    (
        "traversal in the name",
        "name = \"../x\"\nservice_dir = \"/x\"\n",
        "1:8: name: \"../x\" contains '/'",
    ),
    (
        "space in the name",
        "name = \"a b\"\nservice_dir = \"/x\"\n",
        "1:8: name: \"a b\" contains ' '",
    ),
    (
        "missing service_dir",
        "name = \"x\"\n",
        "1:1: service_dir: missing field `service_dir`",
    ),
    (
        "overlay too small",
        "service_dir = \"/x\"\n[overlay]\nsize_mib = 10\n",
        "3:12: overlay.size_mib: 10 MiB is below Apptainer's minimum of 64 MiB",
    ),
    (
        "network without a name",
        "service_dir = \"/x\"\n[[network]]\nargs = []\n",
        "2:1: network.name: missing field `name`",
    ),
    (
        "unknown network key",
        "service_dir = \"/x\"\n[[network]]\nname = \"n\"\nparent = \"eth0\"\n",
        "4:1: network.parent: unknown field `parent`",
    ),
];

#[test]
fn static_config_errors_name_file_line_key_and_exit_78() {
    let d = tempfile::tempdir().unwrap();
    for (what, text, want) in STATIC_CASES {
        let (code, err) = check(d.path(), text, &[]);
        assert_eq!(code, 78, "{what}: {err}");
        let prefix = format!("error: {}:{want}", d.path().join("svc.toml").display());
        assert!(
            err.starts_with(&prefix),
            "{what}:\n got: {err}\nwant: {prefix}…"
        );
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
        format!("{}:2: binds: bind source /nonexistent/src does not exist", file.display()),
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
