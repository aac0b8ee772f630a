//! The managed image pointer (apptainer-supervisor(8), IMAGE POINTER) as `check` shows it,
//! text and `--json`, through the real binary: a pointer into `images/sha256-<hex>.sif`
//! (managed, its digest read from the name), a plain file (unmanaged, with the change that
//! makes it managed, applied here literally with a shell), a pointer whose target is no
//! content address, a dangling pointer (exit 78 at the key), and the path rule over the
//! directory that holds the pointer.

mod support;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::registry::{sha256_file, sif_bytes};
use support::BIN;

/// A service directory with `containers/` and `overlay/`, and its service file naming
/// `image` (a path under the service directory). Returns (service file, service dir).
fn service(dir: &Path, image: &str, extra: &str) -> (PathBuf, PathBuf) {
    let svc = std::fs::canonicalize(dir).unwrap().join("svc");
    std::fs::create_dir_all(svc.join("containers/images")).unwrap();
    std::fs::create_dir_all(svc.join("overlay")).unwrap();
    let file = dir.join("svc.toml");
    std::fs::write(
        &file,
        format!(
            "service_dir = \"{}\"\nimage = \"${{service_dir}}/{image}\"\n{extra}[apptainer]\nbinary = \"/bin/true\"\n",
            svc.display()
        ),
    )
    .unwrap();
    (file, svc)
}

/// A SIF under its content address in `containers/images/`; returns (path, hex).
fn content_addressed(svc: &Path, payload: &[u8]) -> (PathBuf, String) {
    let tmp = svc.join("containers/images/incoming");
    std::fs::write(&tmp, sif_bytes(payload)).unwrap();
    let digest = sha256_file(&tmp);
    let hex = digest.trim_start_matches("sha256:").to_owned();
    let path = svc.join(format!("containers/images/sha256-{hex}.sif"));
    std::fs::rename(&tmp, &path).unwrap();
    (path, hex)
}

fn check(dir: &Path, file: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config-dir")
        .arg(dir)
        .args(["check", "--config"])
        .arg(file)
        .args(extra)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn plan(dir: &Path, file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = check(dir, file, &args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A pointer `containers/current.sif` → `images/sha256-<hex>.sif` is managed: `check` shows
/// the pointer, the file that runs and the short digest, `--json` the full one, and the argv
/// gives Apptainer the target, so that a switched pointer never changes a running instance.
#[test]
fn a_pointer_into_images_is_managed_and_the_argv_names_its_target() {
    let d = tempfile::tempdir().unwrap();
    let (file, svc) = service(d.path(), "containers/current.sif", "");
    let (target, hex) = content_addressed(&svc, b"one\n");
    let pointer = svc.join("containers/current.sif");
    symlink(format!("images/sha256-{hex}.sif"), &pointer).unwrap();

    for extra in [&[][..], &["--host"][..]] {
        let o = check(d.path(), &file, extra);
        let out = text(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        assert!(
            out.contains(&format!(
                "\nimage: {} -> {}\n  managed (digest sha256:{}, read from the file's name)\n",
                pointer.display(),
                target.display(),
                &hex[..12]
            )),
            "{out}"
        );
        let p = plan(d.path(), &file, extra);
        assert_eq!(
            p["image"],
            serde_json::json!({
                "state": "managed",
                "pointer": pointer,
                "target": target,
                "digest": format!("sha256:{hex}"),
            })
        );
        let argv: Vec<&str> = p["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(argv.contains(&target.to_str().unwrap()), "{argv:?}");
        assert!(!argv.contains(&pointer.to_str().unwrap()), "{argv:?}");
    }
}

/// A plain image file is unmanaged: `check` says `update` will refuse it and prints the
/// change that makes it managed. Applied literally (a shell, then the service file's one
/// line), it gives a managed pointer whose digest is the file's sha256; the file itself is
/// kept where it was.
#[test]
fn a_plain_file_is_unmanaged_and_the_printed_fix_makes_it_managed() {
    let d = tempfile::tempdir().unwrap();
    let (file, svc) = service(d.path(), "containers/container.sif", "");
    let image = svc.join("containers/container.sif");
    std::fs::write(&image, sif_bytes(b"plain\n")).unwrap();
    let digest = sha256_file(&image);

    let o = check(d.path(), &file, &["--host"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        out.contains(&format!(
            "\nimage: {}\n  unmanaged: `update` will refuse it (image is not a symbolic link to images/sha256-<hex>.sif)\n  hint: cd {}",
            image.display(),
            svc.join("containers").display()
        )),
        "{out}"
    );
    let p = plan(d.path(), &file, &[]);
    assert_eq!(p["image"]["state"], "unmanaged", "{p:#}");
    let fix = p["image"]["fix"].as_str().unwrap();
    let (shell, rest) = fix.split_once("; then set ").unwrap();
    let line = rest.strip_suffix(" in the service file").unwrap();
    let sh = Command::new("sh").args(["-ec", shell]).output().unwrap();
    assert!(sh.status.success(), "{shell}: {}", text(&sh.stderr));
    let toml = std::fs::read_to_string(&file).unwrap();
    let toml = toml
        .lines()
        .map(|l| if l.starts_with("image = ") { line } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&file, toml + "\n").unwrap();

    let p = plan(d.path(), &file, &["--host"]);
    assert_eq!(p["image"]["state"], "managed", "{p:#}");
    assert_eq!(p["image"]["digest"], digest.as_str());
    assert_eq!(
        p["image"]["pointer"],
        svc.join("containers/current.sif").to_str().unwrap()
    );
    assert!(image.is_file(), "the original file is kept");
}

/// A pointer whose link text is not `images/sha256-<64 hex>.sif` (a named image, an
/// absolute link), or whose `images/` is itself a link elsewhere, runs but is unmanaged.
#[test]
fn a_pointer_whose_target_is_not_content_addressed_is_unmanaged() {
    let d = tempfile::tempdir().unwrap();
    let (file, svc) = service(d.path(), "containers/current.sif", "");
    let named = svc.join("containers/images/ww.sif");
    std::fs::write(&named, sif_bytes(b"named\n")).unwrap();
    let pointer = svc.join("containers/current.sif");
    symlink("images/ww.sif", &pointer).unwrap();
    let o = check(d.path(), &file, &["--host"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        out.contains(&format!(
            "\nimage: {} -> {}\n  unmanaged: `update` will refuse it (the pointer's link text images/ww.sif is not images/sha256-<64 hex>.sif)\n  hint: ln {}",
            pointer.display(),
            named.display(),
            named.display()
        )),
        "{out}"
    );

    // The right name, but absolute: not "beside the pointer" by its text.
    let (target, hex) = content_addressed(&svc, b"abs\n");
    std::fs::remove_file(&pointer).unwrap();
    symlink(&target, &pointer).unwrap();
    let p = plan(d.path(), &file, &[]);
    assert_eq!(p["image"]["state"], "unmanaged", "{p:#}");
    assert_eq!(p["image"]["target"], target.to_str().unwrap());

    // The right text, through an images/ that is a link to another directory.
    std::fs::remove_file(&pointer).unwrap();
    let elsewhere = svc.join("elsewhere");
    std::fs::rename(svc.join("containers/images"), &elsewhere).unwrap();
    symlink(&elsewhere, svc.join("containers/images")).unwrap();
    symlink(format!("images/sha256-{hex}.sif"), &pointer).unwrap();
    let p = plan(d.path(), &file, &[]);
    assert_eq!(p["image"]["state"], "unmanaged", "{p:#}");
    assert!(
        p["image"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("the pointer's target resolves to"),
        "{p:#}"
    );
}

/// A pointer to nothing: nothing could run, so `check` (with or without `--host`) and `run`
/// refuse it with 78, naming the service file, the line and the key.
#[test]
fn a_dangling_pointer_is_refused_with_78_at_the_key() {
    let d = tempfile::tempdir().unwrap();
    let (file, svc) = service(d.path(), "containers/current.sif", "");
    let pointer = svc.join("containers/current.sif");
    let link = format!("images/sha256-{}.sif", "f".repeat(64));
    symlink(&link, &pointer).unwrap();
    for extra in [&[][..], &["--host"][..], &["--json"][..]] {
        let o = check(d.path(), &file, extra);
        assert_eq!(o.status.code(), Some(78), "{extra:?}");
        assert!(o.stdout.is_empty());
        assert_eq!(
            text(&o.stderr),
            format!(
                "error: {}:2: image: image {p} is a symbolic link to {link}, which does not exist: nothing could run\n  hint: point it at an existing image: ln -sfn images/sha256-<hex>.sif {p}\n",
                file.display(),
                p = pointer.display()
            ),
            "{extra:?}"
        );
    }
    let o = Command::new(BIN)
        .arg("--config-dir")
        .arg(d.path())
        .args(["run", "--config"])
        .arg(&file)
        .arg("--run-dir")
        .arg(d.path().join("run"))
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!("{}:2: image", file.display())) && err.contains("does not exist"),
        "{err}"
    );
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The path rule (issue 13) holds for the pointer's directory and the images directory as
/// for any image directory: group-writable is warned about, refused with `strict_paths`;
/// world-writable is refused.
#[test]
fn the_path_rule_covers_the_pointers_directory_and_images() {
    let d = tempfile::tempdir().unwrap();
    let (file, svc) = service(d.path(), "containers/current.sif", "");
    let (_, hex) = content_addressed(&svc, b"rule\n");
    symlink(
        format!("images/sha256-{hex}.sif"),
        svc.join("containers/current.sif"),
    )
    .unwrap();
    for dir in ["containers", "containers/images"] {
        let p = svc.join(dir);
        chmod(&p, 0o775);
        let o = check(d.path(), &file, &["--host"]);
        let out = text(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let warning = format!(
            "warning: {p}: directory above the image is writable by its group (mode 0775): whoever can write it can change what runs as root\n  hint: chmod g-w {p}",
            p = p.display()
        );
        assert!(out.contains(&warning), "{out}");
        let lax = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            &file,
            lax.replace(
                "[apptainer]",
                "[security]\nstrict_paths = true\n[apptainer]",
            ),
        )
        .unwrap();
        let o = check(d.path(), &file, &["--host"]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{err}");
        assert!(err.contains(&warning["warning: ".len()..]), "{err}");
        std::fs::write(&file, lax).unwrap();
        chmod(&p, 0o777);
        let o = check(d.path(), &file, &["--host"]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{err}");
        assert!(
            err.contains(&format!(
                "{p}: directory above the image is writable by others (mode 0777)",
                p = p.display()
            )),
            "{err}"
        );
        chmod(&p, 0o755);
    }
}
