//! apptainer-supervisor-generator, run as systemd runs it (`GENERATOR NORMAL EARLY LATE`)
//! on copies of `tests/fixtures/generator/*.toml`:
//!
//! - golden: each `CASE.toml` gives exactly `CASE.service` and `CASE.links`; the broken
//!   and invalid files give nothing but their messages, and the good ones are still made;
//! - every generated unit passes `systemd-analyze verify` without a word;
//! - messages go to /dev/kmsg as `<3>apptainer-supervisor-generator[PID]: FILE: REASON`,
//!   and to stderr when /dev/kmsg cannot be opened (a private mount namespace with a file
//!   bound over /dev/kmsg: the machine's kernel log is never written);
//! - a name the system's units use gets no unit; an old unit in /etc/systemd/system wins
//!   and is named for removal; a unit below ours is shadowed, with a notice;
//! - `--help` and `--dryrun` print to stdout and never write to the kernel log;
//! - only an unusable output directory fails the run.
//!
//! `UPDATE_GOLDEN=1` rewrites the expected files (read the diff before committing).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{require_root, stderr};

const GEN: &str = env!("CARGO_BIN_EXE_apptainer-supervisor-generator");
const SUPERVISOR: &str = env!("CARGO_BIN_EXE_apptainer-supervisor");
const FIXTURES: &str = "tests/fixtures/generator";
/// Cases that must give a unit.
const GOOD: &[&str] = &["custom-timeouts", "minimal", "no-watchdog", "ood001"];
/// Cases that must give none.
const BAD: &[&str] = &["broken", "invalid"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURES)
}

/// A copy of the fixtures as the config directory, and an empty output directory.
struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new(cases: &[&str]) -> Run {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        for c in cases {
            std::fs::copy(
                fixtures().join(format!("{c}.toml")),
                dir.path().join("etc").join(format!("{c}.toml")),
            )
            .unwrap();
        }
        Run { dir }
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// The test's `/` for unit directories (empty unless a test fills it).
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The generator as systemd calls it, messages to stderr.
    fn generate(&self) -> Output {
        self.command(&["env"], "console")
    }

    /// `prefix` runs the generator (e.g. `unshare -m sh -c ...`); `target` is
    /// SYSTEMD_LOG_TARGET.
    fn command(&self, prefix: &[&str], target: &str) -> Output {
        let d = self.dir.path();
        Command::new(prefix[0])
            .args(&prefix[1..])
            .arg(GEN)
            .arg(self.out())
            .arg(d.join("early"))
            .arg(d.join("late"))
            .env("APPTAINER_SUPERVISOR_CONFIG_DIR", self.etc())
            .env("APPTAINER_SUPERVISOR_UNIT_ROOT", self.root())
            .env("SYSTEMD_LOG_TARGET", target)
            .output()
            .expect("running the generator")
    }

    /// Every file and link under the output directory, relative (`x.wants/y -> ../y`).
    fn tree(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        walk(&self.out(), &self.out(), &mut out);
        out
    }
}

fn walk(root: &Path, d: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let t = e.file_type().unwrap();
        if t.is_symlink() {
            out.insert(format!(
                "{rel} -> {}",
                std::fs::read_link(&p).unwrap().display()
            ));
        } else if t.is_dir() {
            walk(root, &p, out);
        } else {
            out.insert(rel);
        }
    }
}

fn update() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some()
}

#[test]
fn each_service_file_gives_its_golden_unit_and_links() {
    let all: Vec<&str> = GOOD.iter().chain(BAD).copied().collect();
    let r = Run::new(&all);
    let o = r.generate();
    assert!(o.status.success(), "{}", stderr(&o));
    let etc = r.etc().display().to_string();

    let mut expected_tree = BTreeSet::new();
    for case in GOOD {
        let unit = format!("{case}.service");
        let got = std::fs::read_to_string(r.out().join(&unit))
            .unwrap_or_else(|e| panic!("{unit} not generated: {e}\n{}", stderr(&o)))
            .replace(&etc, "@CONFIG_DIR@");
        let golden = fixtures().join(&unit);
        if update() {
            std::fs::write(&golden, &got).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap();
        assert_eq!(got, want, "{unit} differs from {}", golden.display());
        expected_tree.insert(unit);

        let links_file = fixtures().join(format!("{case}.links"));
        let got_links: Vec<String> = r
            .tree()
            .into_iter()
            .filter(|l| l.contains(" -> ") && l.ends_with(&format!("/{case}.service")))
            .collect();
        if update() && !got_links.is_empty() {
            std::fs::write(&links_file, got_links.join("\n") + "\n").unwrap();
        }
        let want_links: Vec<String> = std::fs::read_to_string(&links_file)
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default();
        assert_eq!(got_links, want_links, "links of {case}");
        expected_tree.extend(want_links);
    }
    assert_eq!(
        r.tree(),
        expected_tree,
        "nothing else in the output directory (no unit for {BAD:?})"
    );
    assert!(
        r.tree().iter().any(|l| l.contains(".wants/")),
        "at least one case has [install] links"
    );

    // The broken files are named, with the line and key, and the run went on past them.
    let err = stderr(&o);
    for line in [
        format!("{etc}/broken.toml:1:36: service_dir: invalid basic string"),
        format!("{etc}/broken.toml: no unit generated for it"),
        format!("{etc}/invalid.toml:4:10: unit.after: \"munge\" is not a unit name with its type"),
        format!("{etc}/invalid.toml:7:35: install.wanted_by: \"getty@.service\" is a template"),
        format!("{etc}/invalid.toml: no unit generated for it"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with("apptainer-supervisor-generator[")
                    && l.contains(&format!("]: {line}"))),
            "{line:?} in:\n{err}"
        );
    }
    assert!(
        !err.contains("minimal.toml") && !err.contains("ood001.toml"),
        "nothing said about good files:\n{err}"
    );
}

/// The generated units, with ExecStart='s binary made the built one and the man pages of
/// this tree on MANPATH (as tests/docs.rs verifies the template).
#[test]
fn every_generated_unit_passes_systemd_analyze_verify() {
    let r = Run::new(GOOD);
    let o = r.generate();
    assert!(o.status.success(), "{}", stderr(&o));
    let verify = r.dir.path().join("verify");
    let manpath = r.dir.path().join("man");
    for (page, sect) in [
        ("man/apptainer-supervisor.8", "man8"),
        ("man/apptainer-supervisor-generator.8", "man8"),
        ("man/apptainer-supervisor.toml.5", "man5"),
    ] {
        let d = manpath.join(sect);
        std::fs::create_dir_all(&d).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(page);
        std::fs::copy(&src, d.join(src.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir(&verify).unwrap();
    for case in GOOD {
        let unit = format!("{case}.service");
        let text = std::fs::read_to_string(r.out().join(&unit)).unwrap();
        let exec = "\nExecStart=/usr/bin/apptainer-supervisor ";
        assert_eq!(text.matches(exec).count(), 1, "{unit}: one ExecStart=");
        let text = text.replace(exec, &format!("\nExecStart={SUPERVISOR} "));
        std::fs::write(verify.join(&unit), text).unwrap();
        let mut cmd = Command::new("systemd-analyze");
        cmd.arg("verify")
            .current_dir(&verify)
            .env("MANPATH", &manpath)
            .env_remove("SYSTEMD_LOG_LEVEL");
        if Command::new("man").arg("-w").arg("man").output().is_err() {
            cmd.arg("--man=no");
        }
        let out = cmd
            .arg(verify.join(&unit))
            .output()
            .expect("systemd-analyze (apt-get install systemd)");
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "systemd-analyze verify {unit}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    }
}

/// kmsg records carry the priority and the generator's name and pid; without /dev/kmsg
/// the same lines go to stderr. Both in a private mount namespace, so the machine's
/// kernel log is never written.
#[test]
fn messages_go_to_kmsg_or_else_to_stderr() {
    if !require_root() {
        return;
    }
    let r = Run::new(&["minimal", "broken"]);
    let kmsg = r.dir.path().join("kmsg");
    std::fs::write(&kmsg, "").unwrap();
    let script = format!(
        "mount --make-rprivate / && mount --bind {} /dev/kmsg && exec \"$@\"",
        kmsg.display()
    );
    let o = r.command(&["unshare", "-m", "sh", "-c", &script, "sh"], "kmsg");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "kmsg was usable: {}", stderr(&o));
    let records = std::fs::read_to_string(&kmsg).unwrap();
    let etc = r.etc().display().to_string();
    let want = format!("]: {etc}/broken.toml:1:36: service_dir: invalid basic string");
    assert!(
        records
            .lines()
            .any(|l| l.starts_with("<3>apptainer-supervisor-generator[") && l.contains(&want)),
        "{want:?} in kmsg records:\n{records}"
    );
    assert!(r.out().join("minimal.service").exists());

    // /dev/kmsg read-only: opening it for writing fails, the lines go to stderr.
    let script = format!(
        "mount --make-rprivate / && mount -o bind,ro {} /dev/kmsg && exec \"$@\"",
        kmsg.display()
    );
    std::fs::remove_file(r.out().join("minimal.service")).unwrap();
    let o = r.command(&["unshare", "-m", "sh", "-c", &script, "sh"], "kmsg");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.lines()
            .any(|l| l.starts_with("apptainer-supervisor-generator[") && l.contains(&want)),
        "{want:?} on stderr:\n{err}"
    );
    assert!(r.out().join("minimal.service").exists());
}

/// The unit directories of a host of the test's own (`APPTAINER_SUPERVISOR_UNIT_ROOT`
/// stands for `/`).
fn unit_dir(r: &Run, dir: &str) -> PathBuf {
    let d = r.root().join(dir.trim_start_matches('/'));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A service named like a unit the system ships gets no unit (ours would shadow it, and
/// the template's Conflicts= would stop it), and the message names that unit; the other
/// services are still generated.
#[test]
fn a_name_the_system_already_uses_gets_no_unit() {
    let r = Run::new(&["minimal"]);
    let shipped = unit_dir(&r, "/usr/lib/systemd/system").join("systemd-journald.service");
    std::fs::write(&shipped, "[Unit]\nDescription=Journal Service\n").unwrap();
    std::fs::write(
        r.etc().join("systemd-journald.toml"),
        "service_dir = \"/srv/x\"\n",
    )
    .unwrap();
    let o = r.generate();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!r.out().join("systemd-journald.service").exists());
    assert!(r.out().join("minimal.service").exists());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "systemd-journald.toml: service name \"systemd-journald\": {} is a unit the system ships",
            shipped.display()
        )) && err.contains("no unit generated for it"),
        "{err}"
    );
}

/// Today's start.sh unit in /etc/systemd/system wins over a generated unit: the generator
/// skips that name and says which file to remove.
#[test]
fn an_old_unit_in_etc_is_named_for_removal_and_wins() {
    let r = Run::new(&["minimal", "ood001"]);
    let old = unit_dir(&r, "/etc/systemd/system").join("ood001.service");
    std::fs::write(&old, "[Service]\nType=forking\nExecStart=/bin/true\n").unwrap();
    let o = r.generate();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!r.out().join("ood001.service").exists());
    assert!(r.out().join("minimal.service").exists());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{}: this unit file takes precedence over the ood001.service generated",
            old.display()
        )) && err.contains(&format!("remove {}", old.display())),
        "{err}"
    );
}

/// A unit of the same name in a directory ranked below the generator's (/usr/local/lib)
/// is shadowed by the generated one, with a notice that says so.
#[test]
fn a_unit_that_exists_below_is_generated_with_a_notice() {
    let r = Run::new(&["minimal"]);
    let local = unit_dir(&r, "/usr/local/lib/systemd/system").join("minimal.service");
    std::fs::write(&local, "[Unit]\n").unwrap();
    let o = r.generate();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(r.out().join("minimal.service").exists());
    let err = stderr(&o);
    assert!(
        err.lines().any(|l| l.contains("minimal.toml: ")
            && l.contains(&format!("{} exists too", local.display()))),
        "{err}"
    );
}

/// `--help` prints the usage on stdout and succeeds; `--dryrun` prints the units on stdout
/// and the problems on stderr, writes nothing else, and fails when a file gave no unit.
/// Neither writes to the kernel log: /dev/kmsg is a file of the test's own, in a private
/// mount namespace, and must stay empty.
#[test]
fn help_and_dryrun_are_for_people_and_never_reach_kmsg() {
    if !require_root() {
        return;
    }
    let r = Run::new(&["minimal", "broken"]);
    let kmsg = r.dir.path().join("kmsg");
    std::fs::write(&kmsg, "").unwrap();
    let script = format!(
        "mount --make-rprivate / && mount --bind {} /dev/kmsg && exec \"$@\"",
        kmsg.display()
    );
    let by_hand = |args: &[&str]| {
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script, "sh", GEN])
            .args(args)
            .env("APPTAINER_SUPERVISOR_CONFIG_DIR", r.etc())
            .env("APPTAINER_SUPERVISOR_UNIT_ROOT", r.root())
            .env_remove("SYSTEMD_LOG_TARGET")
            .output()
            .expect("running the generator")
    };
    let o = by_hand(&["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("--dryrun") && help.contains("NORMAL_DIR EARLY_DIR LATE_DIR"),
        "{help}"
    );
    let o = by_hand(&["--dryrun"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "broken.toml gives no unit: {}",
        stderr(&o)
    );
    let units = String::from_utf8_lossy(&o.stdout);
    assert!(units.starts_with("---minimal.service---\n"), "{units}");
    assert!(units.contains("\nExecStart="), "{units}");
    assert!(
        stderr(&o).contains("broken.toml:1:36: service_dir"),
        "{}",
        stderr(&o)
    );
    assert!(r.tree().is_empty(), "--dryrun wrote {:?}", r.tree());
    let o = by_hand(&["one", "two"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&kmsg).unwrap(),
        "",
        "kmsg written by hand"
    );
}

#[test]
fn only_an_unusable_output_directory_fails() {
    let r = Run::new(&["minimal"]);
    std::fs::remove_dir(r.out()).unwrap();
    let o = r.generate();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the output directory does not exist"),
        "{}",
        stderr(&o)
    );
    // No config directory at all: nothing to do, and no failure.
    let r = Run::new(&[]);
    std::fs::remove_dir(r.etc()).unwrap();
    let o = r.generate();
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
    assert!(r.tree().is_empty());
}

/// Unit directives that shrink the capability bounding set (systemd.exec(5)), or, for
/// `NoNewPrivileges=`, cap what execve(2) grants at the supervisor's own narrow permitted
/// set. Apptainer's starter gets that set as its permitted set and aborts every start
/// that asks for more ("Requesting capability set ... while permitted capability set is
/// ...", cmd/starter/c/starter.c:275 at v1.3.6, :283 at v1.4.5): with Apptainer's default
/// `root default capabilities = full`, any one of them breaks every start.
const SHRINKS_CAPABILITIES: &[&str] = &[
    "CapabilityBoundingSet",
    "ProtectKernelLogs",
    "ProtectKernelModules",
    "ProtectClock",
    "PrivateDevices",
    "NoNewPrivileges",
];

/// The `KEY=value` lines of a unit that set one of [`SHRINKS_CAPABILITIES`] to anything
/// but off.
fn capability_shrinkers(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, v)| {
            SHRINKS_CAPABILITIES.contains(&k.trim())
                && !["no", "false", "off", "0"].contains(&v.trim())
        })
        .map(|(k, v)| format!("{}={}", k.trim(), v.trim()))
        .collect()
}

/// The template and, as the generator makes them, the units of every shipped example and
/// every golden case: (where it comes from, its text).
fn shipped_and_generated_units() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let template = root.join("units/apptainer-supervisor@.service");
    let mut units = vec![(
        template.display().to_string(),
        std::fs::read_to_string(&template).unwrap(),
    )];
    // Every shipped example and every golden case, as the generator makes them (one run
    // per directory: both have an ood001.toml).
    let mut sources = Vec::new();
    for src in [root.join("examples"), fixtures()] {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let out = dir.path().join("out");
        std::fs::create_dir(&etc).unwrap();
        std::fs::create_dir(&out).unwrap();
        let mut names = Vec::new();
        for e in std::fs::read_dir(&src).unwrap().flatten() {
            let p = e.path();
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            if p.extension().is_some_and(|x| x == "toml") && !BAD.contains(&stem.as_str()) {
                std::fs::copy(&p, etc.join(p.file_name().unwrap())).unwrap();
                names.push(stem);
            }
        }
        let o = Command::new(GEN)
            .arg(&out)
            .arg(dir.path().join("early"))
            .arg(dir.path().join("late"))
            .env("APPTAINER_SUPERVISOR_CONFIG_DIR", &etc)
            .env("SYSTEMD_LOG_TARGET", "console")
            .output()
            .expect("running the generator");
        assert!(o.status.success(), "{}", stderr(&o));
        for name in names {
            let unit = out.join(format!("{name}.service"));
            let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| {
                panic!("{} not generated: {e}\n{}", unit.display(), stderr(&o))
            });
            units.push((format!("{} → {name}.service", src.display()), text));
            sources.push(name);
        }
    }
    assert!(
        units.len() > 1 + GOOD.len(),
        "the examples were generated too: {sources:?}"
    );
    units
}

#[test]
fn no_unit_shrinks_the_capability_bounding_set() {
    let units = shipped_and_generated_units();
    let bad: Vec<String> = units
        .iter()
        .flat_map(|(name, text)| {
            capability_shrinkers(text)
                .into_iter()
                .map(move |l| format!("{name}: {l}"))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "directives that shrink Apptainer's capabilities:\n{}",
        bad.join("\n")
    );
    // The scan itself finds each of them.
    for d in SHRINKS_CAPABILITIES {
        assert_eq!(
            capability_shrinkers(&format!("[Service]\n# {d}=yes\n{d}=yes\n{d}=no\n")),
            [format!("{d}=yes")]
        );
    }
}

/// Every key the template and the generated units may set: systemd 239 (EL8) knows each,
/// so its journal shows no "Unknown key name" for them. The release that introduced a
/// newer or sandboxing key is from systemd's NEWS (`<=`: NEWS names it only in passing).
/// A key that is not here fails the test below: check its release before adding it.
const KNOWN_TO_239: &[&str] = &[
    // [Unit] and [Install], older than any EL release.
    "Description",
    "Documentation",
    "Wants",
    "Requires",
    "BindsTo",
    "PartOf",
    "After",
    "Before",
    "Conflicts",
    "RequiresMountsFor",
    "SourcePath",
    "WantedBy",
    // [Service]
    "Type",
    "NotifyAccess",
    "ExecStart",
    "KillMode",
    "Restart",
    "RestartSec",
    "RestartForceExitStatus",
    "RestartPreventExitStatus",
    "SuccessExitStatus",
    "TimeoutStartSec",
    "TimeoutStopSec",
    "WatchdogSec",
    "RuntimeDirectory",
    "RuntimeDirectoryPreserve", // 235
    "ProtectSystem",            // 214
    "PrivateMounts",            // 239
    "DevicePolicy",             // <= 210
    "DeviceAllow",              // <= 210; class names (char-pts, block-loop) 210
];

/// Sandboxing keys systemd 239 does not know (NEWS 240-252): a unit of ours that set one
/// would log a warning on EL8 and run without it.
const NEWER_THAN_239: &[&str] = &[
    "ProtectHostname",           // 242
    "RestrictSUIDSGID",          // 242
    "ProtectKernelLogs",         // 244
    "ProtectClock",              // 245
    "ProtectProc",               // 247
    "ProcSubset",                // 247
    "PrivateIPC",                // 248
    "RestrictFileSystems",       // 249
    "SocketBindAllow",           // 249
    "SocketBindDeny",            // 249
    "RestrictNetworkInterfaces", // 250
];

#[test]
fn every_key_of_our_units_is_known_to_systemd_239() {
    let units = shipped_and_generated_units();
    let mut unknown = Vec::new();
    for (name, text) in &units {
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
                continue;
            }
            let key = line.split_once('=').map_or(line, |(k, _)| k).trim();
            assert!(!NEWER_THAN_239.contains(&key), "{name}: {line}");
            if !KNOWN_TO_239.contains(&key) {
                unknown.push(format!("{name}: {line}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "keys not checked against systemd 239 (add them to KNOWN_TO_239 once checked):\n{}",
        unknown.join("\n")
    );
    // The kept hardening is all there, in the template.
    let template = &units[0].1;
    for key in [
        "ProtectSystem",
        "PrivateMounts",
        "DevicePolicy",
        "DeviceAllow",
    ] {
        assert!(
            template.lines().any(|l| l.starts_with(&format!("{key}="))),
            "{key}"
        );
    }
}

/// A description ending in `\` would make systemd read the next line as part of it
/// (systemd.syntax(7) line continuation) and lose `Documentation=`: the generated unit is
/// loaded by a real systemd, which reads both back exactly.
#[test]
fn a_description_ending_in_a_backslash_swallows_no_line() {
    if !require_root() {
        return;
    }
    let r = Run::new(&[]);
    for (name, description) in [("odd", "ends in one \\"), ("even", "ends in two \\\\")] {
        std::fs::write(
            r.etc().join(format!("{name}.toml")),
            format!(
                "service_dir = \"/shared/services/{name}\"\n[unit]\ndescription = {}\ndocumentation = [\"https://example.org/{name}\"]\n",
                toml_string(description)
            ),
        )
        .unwrap();
    }
    let o = r.generate();
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
    let mut units = vec![(
        "asv-host.target".to_owned(),
        "[Unit]\nDescription=test stand-in for asv-host.target\n".to_owned(),
    )];
    for name in ["odd", "even"] {
        let unit = format!("{name}.service");
        units.push((
            unit.clone(),
            std::fs::read_to_string(r.out().join(&unit)).unwrap(),
        ));
    }
    let mut host = support::host::HostSystemd::boot(r.dir.path(), &units);
    for (name, description) in [("odd", "ends in one \\"), ("even", "ends in two \\\\")] {
        let p = host.show(
            &format!("{name}.service"),
            &["Description", "Documentation", "LoadState"],
        );
        assert_eq!(p["LoadState"], "loaded", "{p:?}");
        assert_eq!(p["Description"], description, "{p:?}");
        for doc in [
            format!("https://example.org/{name}"),
            "\"man:apptainer-supervisor-generator(8)\"".to_owned(),
        ] {
            assert!(p["Documentation"].contains(&doc), "{doc}: {p:?}");
        }
    }
    let problems = host.teardown();
    assert!(problems.is_empty(), "{problems:?}");
}

/// A TOML basic string of `s`.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The generator runs before remote file systems are mounted: it reads the service files
/// under /etc only and never looks at the service's own paths (which may live on /shared):
/// a service whose paths are missing, or world-writable (which `run` refuses), still gets
/// its unit, without a word.
#[test]
fn the_generator_never_looks_at_the_services_own_paths() {
    use std::os::unix::fs::PermissionsExt;
    let r = Run::new(&["minimal"]);
    let shared = r.dir.path().join("shared");
    std::fs::create_dir_all(shared.join("svc/bin")).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", shared.join("svc/bin/.service_env")).unwrap();
    std::fs::write(
        r.etc().join("open.toml"),
        format!("service_dir = \"{}\"\n", shared.join("svc").display()),
    )
    .unwrap();
    let o = r.generate();
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
    assert_eq!(
        r.tree(),
        BTreeSet::from(["minimal.service".to_owned(), "open.service".to_owned()])
    );
}
