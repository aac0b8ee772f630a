//! `apptainer-supervisor migrate`, black-box: the seed's start.sh and host_vars of ood001,
//! login005 and ww001 (tests/fixtures/migrate/<svc>/, copied verbatim from
//! apptainer-launchers-and-monitoring.md) give exactly `expected.toml`; that file passes
//! `check` and agrees setting by setting with the hand-made `examples/<svc>.toml` (except
//! the PLACEHOLDER network details and the readiness units, which the inputs do not give);
//! and the error cases have their exit codes (65, 66, 73) and leave files alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use apptainer_supervisor::config::{self, Service};
use apptainer_supervisor::exit;

const BIN: &str = env!("CARGO_BIN_EXE_apptainer-supervisor");

fn fixture(svc: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/migrate")
        .join(svc)
        .join(file)
}

/// The seed's service directories (the paths its start.sh scripts live under).
fn service_dir(svc: &str) -> &'static str {
    match svc {
        "ood001" => "/shared/services/ood/ood001",
        "login005" => "/shared/services/login/login005",
        "ww001" => "/shared/services/ww/ww001",
        other => panic!("no seed service {other}"),
    }
}

fn migrate(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("migrate")
        .args(args)
        .output()
        .expect("run apptainer-supervisor migrate")
}

fn seed_args(svc: &str) -> Vec<String> {
    vec![
        "--start-sh".into(),
        fixture(svc, "start.sh").display().to_string(),
        "--host-vars".into(),
        fixture(svc, "host_vars.yml").display().to_string(),
        "--service-dir".into(),
        service_dir(svc).into(),
    ]
}

fn run_seed(svc: &str) -> Output {
    let args = seed_args(svc);
    let out = migrate(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{svc}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn golden(svc: &str) {
    let out = run_seed(svc);
    let expected = std::fs::read_to_string(fixture(svc, "expected.toml")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "{svc}: migrate's output differs from tests/fixtures/migrate/{svc}/expected.toml"
    );
}

#[test]
fn ood001_is_golden() {
    golden("ood001");
}

#[test]
fn login005_is_golden() {
    golden("login005");
}

#[test]
fn ww001_is_golden() {
    golden("ww001");
}

/// The settings the seed gives, compared with the hand-made example.
fn assert_agrees(svc: &str, got: &Service, example: &Service) {
    assert_eq!(got.name, example.name, "{svc}: name");
    assert_eq!(got.service_dir, example.service_dir, "{svc}: service_dir");
    assert_eq!(got.image, example.image, "{svc}: image");
    assert_eq!(got.image_url, example.image_url, "{svc}: image_url");
    assert_eq!(got.boot, example.boot, "{svc}: boot");
    let specs = |s: &Service| s.binds.iter().map(|b| b.spec()).collect::<Vec<_>>();
    assert_eq!(specs(got), specs(example), "{svc}: binds");
    assert_eq!(got.env_file.path, example.env_file.path, "{svc}: env_file");
    assert_eq!(got.env, example.env, "{svc}: env");
    let nets = |s: &Service| {
        s.networks
            .iter()
            .map(|n| n.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(nets(got), nets(example), "{svc}: network names");
    assert_eq!(got.overlay, example.overlay, "{svc}: overlay");
    assert_eq!(got.apptainer, example.apptainer, "{svc}: [apptainer]");
    assert_eq!(got.hostname, example.hostname, "{svc}: hostname");
}

#[test]
fn output_agrees_with_the_examples_setting_by_setting() {
    for svc in ["ood001", "login005", "ww001"] {
        let out = run_seed(svc);
        let text = String::from_utf8(out.stdout).unwrap();
        let got = config::parse(&text, Path::new(&format!("{svc}.toml")), None)
            .unwrap_or_else(|e| panic!("{svc}: {e}"));
        let example_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(format!("{svc}.toml"));
        let example = config::load(&example_path, None).unwrap();
        assert_agrees(svc, &got, &example);
        // What the example has and migrate cannot know: the conflists' contents
        // (PLACEHOLDERs there) and the units inside. migrate leaves the conflists to
        // Ansible and says so.
        assert!(got.networks.iter().all(|n| n.cni.is_none()), "{svc}");
        assert!(got.readiness.required_units.is_empty(), "{svc}");
    }
}

#[test]
fn written_file_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    for svc in ["ood001", "login005", "ww001"] {
        let out_path = dir.path().join(format!("{svc}.toml"));
        let mut args = seed_args(svc);
        args.push("-o".into());
        args.push(out_path.display().to_string());
        let out = migrate(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(0), "{svc}");
        assert!(out.stdout.is_empty(), "{svc}: -o writes nothing to stdout");
        let written = std::fs::read_to_string(&out_path).unwrap();
        let expected = std::fs::read_to_string(fixture(svc, "expected.toml")).unwrap();
        assert_eq!(written, expected, "{svc}");
        let check = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&out_path)
            .output()
            .unwrap();
        assert_eq!(
            check.status.code(),
            Some(0),
            "{svc}: check --config failed:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

#[test]
fn each_input_alone_gives_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    for svc in ["ood001", "login005", "ww001"] {
        for (flag, file) in [("--start-sh", "start.sh"), ("--host-vars", "host_vars.yml")] {
            let out_path = dir.path().join(format!("{svc}-{file}.toml"));
            let input = fixture(svc, file);
            let out = migrate(&[
                flag,
                input.to_str().unwrap(),
                "--service-dir",
                service_dir(svc),
                "--output",
                out_path.to_str().unwrap(),
            ]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{svc} {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let s = config::load(&out_path, None).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.name, svc);
            assert!(s.boot);
            assert!(!s.binds.is_empty());
        }
    }
}

#[test]
fn ww001_warnings_name_what_looks_wrong() {
    let out = run_seed("ww001");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let toml = String::from_utf8_lossy(&out.stdout);
    let start_sh = fixture("ww001", "start.sh");
    // The relative overlay: where it really resolved, and what it became.
    let overlay = format!(
        "warning: {}:10: --overlay overlay.img is relative",
        start_sh.display()
    );
    assert!(stderr.contains(&overlay), "{stderr}");
    assert!(stderr.contains("start.sh used /overlay.img"), "{stderr}");
    assert!(
        stderr.contains("(/shared/services/ww/ww001/overlay/overlay.img)"),
        "{stderr}"
    );
    // The same, as a comment right above the setting it concerns.
    let at = toml
        .find("path = \"${service_dir}/overlay/overlay.img\"")
        .unwrap();
    let before = &toml[..at];
    let comment = before
        .rfind("# migrate: start.sh:10: --overlay overlay.img")
        .unwrap();
    assert!(
        before[comment..].lines().all(|l| l.starts_with('#')),
        "the warning sits right above overlay.path"
    );
    // $DIRNAME is never set in the seed's excerpt of ww001's start.sh.
    assert!(
        stderr.contains("$DIRNAME is used but never set"),
        "{stderr}"
    );
    // Unquoted $DIRNAME in -B.
    assert!(
        stderr.contains(&format!(
            "warning: {}:9: $DIRNAME unquoted",
            start_sh.display()
        )),
        "{stderr}"
    );
}

#[test]
fn unknown_flags_and_service_env_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("svc/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("start.sh"),
        "#!/bin/bash\nSCRIPT=$(realpath \"$0\")\nDIRNAME=$(dirname \"$SCRIPT\")/../\n\
         source $DIRNAME/bin/.service_env\n\
         apptainer instance start --boot --writable-tmpfs -B \"$DIRNAME/data:/data\" \
         \"$DIRNAME/containers/container.sif\" svc\n",
    )
    .unwrap();
    std::fs::write(bin.join(".service_env"), "SITE=prod\n").unwrap();
    let out = migrate(&["--start-sh", bin.join("start.sh").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let toml = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr
            .contains("--writable-tmpfs: no service-file key for it; kept in apptainer.extra_args"),
        "{stderr}"
    );
    assert!(stderr.contains("SITE: start.sh's `source` made it a shell variable only"));
    assert!(stderr.contains("SITE: reaches the container's init, but with --boot"));
    let s = config::parse(&toml, Path::new("svc.toml"), None).unwrap();
    // The service directory is the one above start.sh's bin/, as $DIRNAME was.
    assert_eq!(
        s.service_dir,
        std::fs::canonicalize(dir.path().join("svc")).unwrap()
    );
    assert_eq!(s.apptainer.extra_args, ["--writable-tmpfs"]);
    assert_eq!(
        s.binds[0].spec(),
        format!("{}/data:/data", s.service_dir.display())
    );
    assert!(
        s.env_file.explicit,
        "an unguarded source must find its file"
    );
}

#[test]
fn missing_input_is_66() {
    let out = migrate(&["--start-sh", "/nonexistent/start.sh", "--service-dir", "/s"]);
    assert_eq!(out.status.code(), Some(exit::NOINPUT));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/start.sh: cannot read"),
        "{stderr}"
    );
}

#[test]
fn garbage_is_65_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let sh = dir.path().join("start.sh");
    std::fs::write(
        &sh,
        "#!/bin/bash\n\napptainer instance start \"unterminated\n",
    )
    .unwrap();
    let out = migrate(&["--start-sh", sh.to_str().unwrap(), "--service-dir", "/s"]);
    assert_eq!(out.status.code(), Some(exit::DATAERR));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(&format!("{}:3: unterminated double quote", sh.display())));

    let nothing = dir.path().join("nothing.sh");
    std::fs::write(&nothing, "echo hello\n").unwrap();
    let out = migrate(&[
        "--start-sh",
        nothing.to_str().unwrap(),
        "--service-dir",
        "/s",
    ]);
    assert_eq!(out.status.code(), Some(exit::DATAERR));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `apptainer instance start`"));

    let yml = dir.path().join("ood001.yml");
    std::fs::write(
        &yml,
        "servicename: ood001\napptainer_options:\n  mounts: [/a, /b\n",
    )
    .unwrap();
    let out = migrate(&["--host-vars", yml.to_str().unwrap(), "--service-dir", "/s"]);
    assert_eq!(out.status.code(), Some(exit::DATAERR));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:", yml.display())), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn existing_output_is_untouched_and_73() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("ood001.toml");
    let before = b"# an operator's own file\nname = \"ood001\"\n";
    std::fs::write(&out_path, before).unwrap();
    let mut args = seed_args("ood001");
    args.push("--output".into());
    args.push(out_path.display().to_string());
    let out = migrate(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(exit::CANTCREAT));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already; not overwritten"));
    assert_eq!(std::fs::read(&out_path).unwrap(), before);
    // Nothing else was left in the directory (no temporary file).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn no_input_is_a_usage_error() {
    let out = migrate(&["--name", "x"]);
    assert_eq!(out.status.code(), Some(exit::USAGE));
}

/// `--boot` without `--network` gave the container Apptainer's default `bridge` network;
/// the supervisor passes `--network none` unless the service names it, so migrate writes it.
#[test]
fn boot_without_network_keeps_apptainers_bridge_explicitly() {
    let out = migrate(&[
        "--start-sh",
        fixture("boot-no-network", "start.sh").to_str().unwrap(),
        "--service-dir",
        "/srv/web001",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8_lossy(&out.stdout);
    let expected = std::fs::read_to_string(fixture("boot-no-network", "expected.toml")).unwrap();
    assert_eq!(
        toml, expected,
        "migrate's output differs from tests/fixtures/migrate/boot-no-network/expected.toml"
    );
    let s = config::parse(&toml, Path::new("web001.toml"), None).unwrap();
    assert_eq!(s.networks.len(), 1);
    assert_eq!(s.networks[0].name, "bridge");
    assert!(
        s.networks[0].cni.is_none(),
        "external: Apptainer's own file"
    );
}

/// `--image-pointer`: `image` is the managed pointer beside the start.sh's image, and the
/// note's one-time command, run in a copy of the layout, makes a pointer `check` calls
/// managed (the digest of the very file the service ran before).
#[test]
fn image_pointer_names_the_managed_pointer_and_its_note_makes_it() {
    let d = tempfile::tempdir().unwrap();
    let svc = d.path().join("ood001");
    std::fs::create_dir_all(svc.join("bin")).unwrap();
    std::fs::create_dir_all(svc.join("containers")).unwrap();
    std::fs::copy(fixture("ood001", "start.sh"), svc.join("bin/start.sh")).unwrap();
    let mut sif = b"#!/usr/bin/env run-singularity\n".to_vec();
    sif.resize(32, 0);
    sif.extend_from_slice(b"SIF_MAGIC\0ood001 image");
    std::fs::write(svc.join("containers/container.sif"), &sif).unwrap();
    let out = migrate(&[
        "--start-sh",
        svc.join("bin/start.sh").to_str().unwrap(),
        "--image-pointer",
    ]);
    let (toml, err) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        toml.contains("image = \"${service_dir}/containers/current.sif\""),
        "{toml}"
    );
    // On stderr in one line (the file's comment folds it).
    let cmd = err
        .lines()
        .find_map(|l| {
            l.split_once("make it once: ")
                .map(|(_, c)| c.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("the note with the command: {err}"));
    assert!(
        toml.contains("# migrate (note): image is the managed pointer"),
        "{toml}"
    );
    let sh = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    assert!(
        sh.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&sh.stderr)
    );
    let file = d.path().join("ood001.toml");
    std::fs::write(&file, &toml).unwrap();
    let check = Command::new(BIN)
        .args(["check", "--json", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&check.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&check.stderr)));
    let hex = {
        let o = Command::new("sha256sum")
            .arg(svc.join("containers/container.sif"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)[..64].to_owned()
    };
    assert_eq!(
        v["image"]["state"],
        "managed",
        "{}",
        serde_json::to_string_pretty(&v["image"]).unwrap()
    );
    assert_eq!(v["image"]["digest"], format!("sha256:{hex}"));
}
