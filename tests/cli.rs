//! The command line as an operator uses it, on the built binaries:
//!
//! - a closed pipe (`… | (exec 0<&-; …)`, `| head`) ends every command quietly with its
//!   usual exit status: no panic, no core dump;
//! - `NAME`, `NAME.toml`, `NAME.service`, `apptainer-supervisor@NAME(.service)` all name
//!   the service;
//! - `status NAME` of a service that does not exist is an error (exit 4, as systemctl's),
//!   `status --no-legend` prints rows only, `status --json` carries `schema_version`;
//! - a service named like a unit the system ships is refused by `check` and `run`; an old
//!   unit file of the same name in /etc/systemd/system is named by `status` and
//!   `check --host` as the file to remove.
//!
//! Hermetic: every command gets a config directory, a run directory and a unit root
//! (`APPTAINER_SUPERVISOR_UNIT_ROOT`) of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_apptainer-supervisor");
const GEN: &str = env!("CARGO_BIN_EXE_apptainer-supervisor-generator");

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A config directory, a run directory and a unit root, all empty at first.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        for d in ["etc", "run", "root"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Host { dir }
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Copies an example into the config directory.
    fn with_example(self, name: &str) -> Host {
        std::fs::copy(
            repo(&format!("examples/{name}.toml")),
            self.etc().join(format!("{name}.toml")),
        )
        .unwrap();
        self
    }

    /// A unit file under the unit root, e.g. `/usr/lib/systemd/system/sshd.service`.
    fn unit(&self, path: &str, text: &str) -> PathBuf {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `apptainer-supervisor --config-dir ETC ARGS…`, with `status`'s and `run`'s run
    /// directory added where they take one.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config-dir").arg(self.etc()).args(args);
        if matches!(args.first(), Some(&"status") | Some(&"run")) {
            c.arg("--run-dir").arg(self.dir.path().join("run"));
        }
        c.env("APPTAINER_SUPERVISOR_UNIT_ROOT", self.root())
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .env_remove("NOTIFY_SOCKET");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run apptainer-supervisor")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` with its stdout the write end of a pipe whose read end is already closed,
/// as `cmd | (exec 0<&-; sleep 1)` does once the reader has closed it. Returns the exit
/// code and stderr.
fn into_closed_pipe(cmd: &mut Command) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = cmd
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("spawn");
    (out.status.code(), text(&out.stderr))
}

#[test]
fn every_command_ends_quietly_on_a_closed_pipe() {
    let h = Host::new().with_example("ood001");
    let start_sh = repo("tests/fixtures/migrate/ood001/start.sh");
    let start_sh = start_sh.to_str().unwrap();
    let ww001 = repo("examples/ww001.toml");
    let ww001 = ww001.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["check", "--config", ww001, "--json"],
        vec!["check", "--config", ww001],
        vec!["check", "ood001"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["status", "--no-legend"],
        vec!["migrate", "--start-sh", start_sh],
        vec!["completions", "bash"],
        vec!["completions", "zsh"],
        vec!["--help"],
        vec!["--version"],
    ];
    for args in cases {
        // What the command exits with when its output is read.
        let normal = h.run(&args);
        assert!(
            !normal.stdout.is_empty(),
            "{args:?} printed nothing: {}",
            text(&normal.stderr)
        );
        let (code, err) = into_closed_pipe(&mut h.cmd(&args));
        assert_eq!(
            code,
            normal.status.code(),
            "{args:?} into a closed pipe: stderr {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(
            err,
            text(&normal.stderr),
            "{args:?}: a closed pipe must add nothing to stderr"
        );
    }
    for args in [&["--dryrun"][..], &["--help"][..]] {
        let mut gen = Command::new(GEN);
        gen.args(args)
            .env("APPTAINER_SUPERVISOR_CONFIG_DIR", h.etc())
            .env("APPTAINER_SUPERVISOR_UNIT_ROOT", h.root());
        let normal = gen.output().expect("generator");
        assert!(
            normal.status.success() && !normal.stdout.is_empty(),
            "{normal:?}"
        );
        let (code, err) = into_closed_pipe(&mut gen);
        assert_eq!(code, Some(0), "generator {args:?}: {err}");
        assert!(err.is_empty(), "generator {args:?}: {err}");
    }
}

#[test]
fn every_spelling_of_a_service_name_works() {
    let h = Host::new().with_example("ood001");
    for arg in [
        "ood001",
        "ood001.toml",
        "ood001.service",
        "apptainer-supervisor@ood001",
        "apptainer-supervisor@ood001.service",
    ] {
        let o = h.run(&["check", arg]);
        assert_eq!(o.status.code(), Some(0), "check {arg}: {}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains("ood001.toml: service ood001 is valid"),
            "check {arg}: {}",
            text(&o.stdout)
        );
        let o = h.run(&["status", "--no-legend", arg]);
        // Not running: 3, as systemctl status says for an inactive unit; the row is ood001.
        assert_eq!(
            o.status.code(),
            Some(3),
            "status {arg}: {}",
            text(&o.stderr)
        );
        assert!(
            text(&o.stdout).starts_with("ood001 "),
            "status {arg}: {}",
            text(&o.stdout)
        );
    }
}

#[test]
fn status_of_a_service_that_does_not_exist_is_exit_4() {
    let h = Host::new().with_example("ood001");
    for json in [false, true] {
        let mut args = vec!["status", "nosuch"];
        if json {
            args.push("--json");
        }
        let o = h.run(&args);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.contains("error: no service nosuch: no ")
                && err.contains(&format!("{}", h.etc().join("nosuch.toml").display())),
            "{err}"
        );
        let out = text(&o.stdout);
        assert!(!out.contains("nosuch"), "a made-up row: {out}");
    }
    // Beside a real one: the real row is shown, the exit status is still 4.
    let o = h.run(&["status", "nosuch", "ood001", "--json"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(rows[0]["service"], "ood001");
}

#[test]
fn status_no_legend_prints_rows_only_and_json_has_a_schema_version() {
    let h = Host::new().with_example("ood001").with_example("ww001");
    let o = h.run(&["status", "--no-legend"]);
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("ood001 ") && lines[1].starts_with("ww001 "),
        "{out}"
    );
    let with_legend = text(&h.run(&["status"]).stdout);
    assert!(with_legend.starts_with("SERVICE "), "{with_legend}");

    let o = h.run(&["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["schema_version"], 1, "{row}");
    }
}

#[test]
fn a_name_the_system_uses_is_refused_by_check_and_run() {
    let h = Host::new();
    let shipped = h.unit(
        "/usr/lib/systemd/system/systemd-journald.service",
        "[Unit]\nDescription=Journal Service\n",
    );
    std::fs::write(
        h.etc().join("systemd-journald.toml"),
        "service_dir = \"/srv/x\"\n",
    )
    .unwrap();
    for args in [
        &["check", "systemd-journald"][..],
        &["run", "systemd-journald"][..],
    ] {
        let o = h.run(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "service name \"systemd-journald\": {} is a unit the system ships",
                shipped.display()
            )),
            "{args:?}: {err}"
        );
        assert_eq!(
            err.matches("error:").count(),
            1,
            "{args:?}: the error once: {err}"
        );
    }
    // An alias of a shipped unit, as Debian links sshd.service to ssh.service.
    let alias = h.root().join("etc/systemd/system/sshd.service");
    std::fs::create_dir_all(alias.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/lib/systemd/system/ssh.service", &alias).unwrap();
    std::fs::write(h.etc().join("sshd.toml"), "service_dir = \"/srv/x\"\n").unwrap();
    let o = h.run(&["check", "sshd"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o.stderr));
}

#[test]
fn an_old_unit_in_etc_is_named_by_status_as_the_file_to_remove() {
    let h = Host::new().with_example("ood001");
    let old = h.unit(
        "/etc/systemd/system/ood001.service",
        "[Service]\nType=forking\nExecStart=/shared/services/ood/ood001/bin/start.sh\n",
    );
    let o = h.run(&["status"]);
    let out = text(&o.stdout);
    assert!(
        out.lines().any(|l| l.starts_with("warning: ood001: ")
            && l.contains(&format!("remove {}", old.display()))),
        "{out}"
    );
    // Valid all the same: the static check passes.
    let o = h.run(&["check", "ood001"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

/// `check --host` passes for a service whose old unit file is still in /etc, and warns
/// which file to remove.
#[test]
fn check_host_names_an_old_unit_in_etc_as_the_file_to_remove() {
    let h = Host::new();
    let svc = h.dir.path().join("svc");
    std::fs::create_dir_all(svc.join("containers")).unwrap();
    std::fs::create_dir_all(svc.join("overlay")).unwrap();
    std::fs::write(svc.join("containers/container.sif"), "").unwrap();
    std::fs::write(
        h.etc().join("x1.toml"),
        format!(
            "service_dir = \"{}\"\nboot = false\n[apptainer]\nbinary = \"{}\"\n",
            svc.display(),
            repo("tests/support/apptainer").display()
        ),
    )
    .unwrap();
    let o = h.run(&["check", "x1", "--host"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    let old = h.unit(
        "/etc/systemd/system/x1.service",
        "[Service]\nType=forking\n",
    );
    let o = h.run(&["check", "x1", "--host"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.starts_with(&format!(
            "warning: {}: this unit file takes precedence",
            old.display()
        )) && err.contains(&format!("remove {}", old.display())),
        "{err}"
    );
}
