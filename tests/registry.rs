//! `apptainer pull oras://` against a real OCI registry (Debian's docker-registry on
//! 127.0.0.1, support/registry.rs), through the Apptainer CLI double (DOUBLE.md, "pull
//! oras://"): the groundwork of image updates (issue 17). Needs the docker-registry package
//! (tests/setup.sh): fails without it when `CI=true`.
mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use support::names_in;
use support::registry::{
    files_under, require_registry, sha256_file, sif_bytes, GatedRelay, Registry,
};

/// The double's `pull`, with its cache, config dir and temporary directory in `root` (so
/// a test sees every file the pull leaves).
fn pull_cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(support::support("apptainer"));
    c.arg("pull")
        .args(args)
        .env("APPTAINER_CACHEDIR", root.join("cachedir"))
        .env("APPTAINER_CONFIGDIR", root.join("config"))
        .env("TMPDIR", root.join("tmp"))
        .env_remove("APPTAINER_DISABLE_CACHE")
        .stdin(Stdio::null());
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    c
}

fn pull(root: &Path, args: &[&str]) -> Output {
    pull_cmd(root, args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_pushed_sif_pulls_through_the_double_and_its_sha256_is_the_layer_digest() {
    if !require_registry() {
        return;
    }
    let reg = Registry::start();
    eprintln!(
        "docker-registry answered /v2/ {:.1} ms after spawn",
        reg.start_time.as_secs_f64() * 1000.0
    );
    let data = sif_bytes(b"image one\n");
    let pushed = reg.push_sif("svc/ww001", "v1", "ww001.sif", &data);
    assert_ne!(pushed.manifest_digest, pushed.layer_digest);

    let root = tempfile::tempdir().unwrap();
    let dest_dir = root.path().join("images");
    std::fs::create_dir(&dest_dir).unwrap();
    let dest = dest_dir.join("new.sif");
    let out = pull(
        root.path(),
        &[dest.to_str().unwrap(), &reg.oras_url("svc/ww001", "v1")],
    );
    assert!(out.status.success(), "pull: {}", text(&out.stderr));
    assert_eq!(sha256_file(&dest), pushed.layer_digest);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    // Through the cache (the default): the entry is named by the layer digest, and the
    // destination directory holds the file only (CopyFileAtomic's temporary renamed away).
    assert_eq!(names_in(&dest_dir), ["new.sif"]);
    let entry = root
        .path()
        .join("cachedir/cache/oras")
        .join(&pushed.layer_digest);
    assert_eq!(sha256_file(&entry), pushed.layer_digest);
    assert!(files_under(&root.path().join("tmp")).is_empty());

    // Without the cache: straight to the destination, the same bytes.
    let dest2 = dest_dir.join("direct.sif");
    let out = pull(
        root.path(),
        &[
            "--disable-cache",
            dest2.to_str().unwrap(),
            &reg.oras_url("svc/ww001", "v1"),
        ],
    );
    assert!(
        out.status.success(),
        "pull --disable-cache: {}",
        text(&out.stderr)
    );
    assert_eq!(sha256_file(&dest2), pushed.layer_digest);

    // A tag that is not there: Apptainer's fatal error, exit 255, no file.
    let dest3 = dest_dir.join("none.sif");
    let out = pull(
        root.path(),
        &[dest3.to_str().unwrap(), &reg.oras_url("svc/ww001", "nope")],
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("FATAL:   While pulling image from oci registry: error fetching image to cache: failed to get checksum for"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dest3.exists());
}

/// Apptainer fetches the config blob too (layout.WriteImage through AppendImage), and
/// verifies it: a manifest whose config the registry no longer has fails the pull, and
/// nothing is created under the final name.
#[test]
fn a_pull_whose_config_blob_is_gone_fails_and_creates_nothing() {
    if !require_registry() {
        return;
    }
    let reg = Registry::start();
    let pushed = reg.push_sif("svc/ood009", "v1", "ood009.sif", &sif_bytes(b"nine\n"));
    reg.delete_blob("svc/ood009", &pushed.config_digest);
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("new.sif");
    for cache in [&[][..], &["--disable-cache"][..]] {
        let mut args: Vec<&str> = cache.to_vec();
        let url = reg.oras_url("svc/ood009", "v1");
        args.extend([dest.to_str().unwrap(), url.as_str()]);
        let out = pull(root.path(), &args);
        assert_eq!(
            out.status.code(),
            Some(255),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(&pushed.config_digest),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!dest.exists(), "{args:?}: nothing under the final name");
    }
}

#[test]
fn a_pull_onto_an_existing_file_without_force_is_refused_as_apptainer_does() {
    if !require_registry() {
        return;
    }
    let reg = Registry::start();
    let data = sif_bytes(b"image two\n");
    let pushed = reg.push_sif("svc/ww002", "v2", "ww002.sif", &data);
    let root = tempfile::tempdir().unwrap();
    let dest_dir = root.path().join("images");
    std::fs::create_dir(&dest_dir).unwrap();
    let dest = dest_dir.join("current.sif");
    std::fs::write(&dest, b"the running image").unwrap();

    // cmd/internal/cli/pull.go pullRun (:215/:234): sylog.Fatalf, exit 255, before any
    // transfer; the file untouched.
    let out = pull(
        root.path(),
        &[dest.to_str().unwrap(), &reg.oras_url("svc/ww002", "v2")],
    );
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!(
            "FATAL:   Image file already exists: \"{}\" - will not overwrite\n",
            dest.display()
        )
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"the running image");
    assert_eq!(names_in(&dest_dir), ["current.sif"]);

    // --force: replaced by a rename over it (CopyFileAtomic).
    let out = pull(
        root.path(),
        &[
            "--force",
            dest.to_str().unwrap(),
            &reg.oras_url("svc/ww002", "v2"),
        ],
    );
    assert!(out.status.success(), "pull --force: {}", text(&out.stderr));
    assert_eq!(sha256_file(&dest), pushed.layer_digest);
}

/// The registry SIGKILLed while the SIF blob is on its way (a 64 MiB blob held by a relay
/// after its first MiB, so the registry is blocked mid-send when it dies): the pull fails
/// with a non-zero exit and nothing is under the final name, nor in the cache or the
/// temporary directory; with the cache and without it.
#[test]
fn a_registry_stopped_mid_transfer_leaves_no_file_under_the_final_name() {
    if !require_registry() {
        return;
    }
    let payload: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    let data = sif_bytes(&payload);
    for disable_cache in [false, true] {
        let mut reg = Registry::start();
        reg.push_sif("svc/big", "v1", "big.sif", &data);
        let relay = GatedRelay::start(&reg.addr, 1 << 20);
        let root = tempfile::tempdir().unwrap();
        let dest_dir = root.path().join("images");
        std::fs::create_dir(&dest_dir).unwrap();
        let dest = dest_dir.join("new.sif");
        let url = format!("oras://{}/svc/big:v1", relay.addr);
        let mut args = vec![dest.to_str().unwrap(), url.as_str()];
        if disable_cache {
            args.insert(0, "--disable-cache");
        }
        let child = pull_cmd(root.path(), &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            relay.wait_held(Duration::from_secs(60)),
            "the blob's transfer never started"
        );
        reg.kill();
        relay.release();
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(255),
            "--disable-cache={disable_cache}: {err}"
        );
        assert!(
            err.contains("unable to Download Image: unexpected EOF"),
            "--disable-cache={disable_cache}: {err}"
        );
        assert!(!dest.exists(), "a file under the final name");
        assert!(names_in(&dest_dir).is_empty(), "{:?}", names_in(&dest_dir));
        assert!(
            files_under(&root.path().join("cachedir")).is_empty(),
            "{:?}",
            files_under(&root.path().join("cachedir"))
        );
        assert!(files_under(&root.path().join("tmp")).is_empty());
    }
}
