//! Getting a new image: `apptainer pull` into a private name in `images/`, its sha256, then
//! the content-addressed name — so that an interrupted pull never leaves anything under a
//! name that a pointer could name.
//!
//! Why a private name: with `--disable-cache` Apptainer writes the pull's target path
//! itself (the ORAS path downloads the blob into a temporary OCI layout, then copies it
//! into the destination in place: internal/pkg/client/oras/oras.go `DownloadImage`, see
//! tests/support/DOUBLE.md rows 36–41), so a pull straight to `sha256-<hex>.sif` could
//! leave a partial file under a final name. `--disable-cache` keeps Apptainer's cache (in
//! root's home) from growing by a copy of every image.
//!
//! The whole pull happens in a private directory beside the images
//! (`images/.pull-<pid>-<ms>/`), which is also its temporary directory (`TMPDIR`, which
//! Apptainer 1.3's `os.MkdirTemp("", "oras-tmp-")` uses, and `APPTAINER_TMPDIR`, which
//! 1.4's `--tmpdir` reads): a multi-GB layer is never downloaded into a small `/tmp`,
//! and an interrupted pull (Apptainer killed before its deferred clean-up runs) leaves
//! nothing but that directory, which is removed.
//!
//! Why a pull, and not a registry query, to learn the digest (also for `--dry-run`): the
//! pull is Apptainer's own, with the site's registry logins (`apptainer registry login`),
//! CA bundle, proxy and `--no-https` settings; a registry client of our own would need an
//! HTTP/TLS stack (ureq + rustls + webpki, some twenty crates, or OpenSSL bindings) and
//! would still disagree with Apptainer about credentials. The cost is one transfer per
//! `--dry-run`, which a site's update cadence (hours to weeks) affords.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::Interrupt;
use crate::os::sanitize;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("apptainer pull {url} failed ({status}){tail}")]
    Failed {
        url: String,
        status: String,
        tail: String,
    },
    #[error("interrupted during the pull of {url}: the partial download was removed, nothing was switched")]
    Interrupted { url: String },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sha256sum of {}: {why}", .path.display())]
    Hash { path: PathBuf, why: String },
}

/// A pulled image under its content address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// `images/sha256-<hex>.sif`.
    pub path: PathBuf,
    pub hex: String,
    /// It was there already (pulled before, or an earlier image): nothing new was written.
    pub existed: bool,
}

/// The private directory a pull works in: hidden, never `sha256-*`, unique to this process.
fn private_dir(images: &Path) -> PathBuf {
    images.join(format!(
        ".pull-{}-{}",
        std::process::id(),
        crate::os::live::unix_now_ms()
    ))
}

/// Pulls `url` with `apptainer` into `images` (created 0755 if missing). `keep`: false for
/// `--dry-run`, which only learns the digest and removes the file again.
pub async fn pull(
    apptainer: &Path,
    url: &str,
    images: &Path,
    interrupt: &Interrupt,
    keep: bool,
) -> Result<Pulled, PullError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| PullError::Io { what, path, source }
    };
    std::fs::create_dir_all(images).map_err(io("creating", images))?;
    let work = private_dir(images);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(io("creating", &work))?;
    let _guard = RemoveOnDrop(work.clone());
    let tmp = work.join("image.sif");
    let child = tokio::process::Command::new(apptainer)
        .args(["pull", "--disable-cache"])
        .arg(&tmp)
        .arg(url)
        .env("TMPDIR", &work)
        .env("APPTAINER_TMPDIR", &work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: an interrupt ends Apptainer and whatever it runs.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| PullError::Spawn {
            binary: apptainer.to_owned(),
            source,
        })?;
    interrupt.set_group(child.id().map_or(0, |p| p as i32));
    let out = child.wait_with_output().await;
    interrupt.set_group(0);
    if interrupt.fired() {
        return Err(PullError::Interrupted {
            url: url.to_owned(),
        });
    }
    let out = out.map_err(|source| PullError::Spawn {
        binary: apptainer.to_owned(),
        source,
    })?;
    if !out.status.success() {
        let mut text = out.stderr;
        text.extend_from_slice(&out.stdout);
        // The last lines, escaped: a registry's error text reaches the terminal.
        let text = String::from_utf8_lossy(&text);
        let last: Vec<&str> = text.lines().rev().take(10).collect();
        let tail: Vec<String> = last.iter().rev().map(|l| sanitize::lines(l, 512)).collect();
        return Err(PullError::Failed {
            url: url.to_owned(),
            status: out.status.to_string(),
            tail: if tail.is_empty() {
                String::new()
            } else {
                format!(":\n  {}", tail.join("\n  "))
            },
        });
    }
    let hex = sha256(&tmp).await?;
    let path = images.join(format!("sha256-{hex}.sif"));
    if !keep {
        return Ok(Pulled {
            existed: path.exists(),
            path,
            hex,
        });
    }
    // link(2) never replaces: an existing file of that name is that content already.
    let existed = match std::fs::hard_link(&tmp, &path) {
        Ok(()) => false,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => true,
        Err(e) => return Err(io("placing the image at", &path)(e)),
    };
    std::fs::File::open(images)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", images))?;
    Ok(Pulled { path, hex, existed })
}

/// The file's sha256, by coreutils' `sha256sum` reading it on stdin (a multi-GB image is
/// hashed at the speed of the system's optimised implementation, and no hashing crate
/// is added for one call).
async fn sha256(path: &Path) -> Result<String, PullError> {
    let file = std::fs::File::open(path).map_err(|source| PullError::Io {
        what: "opening",
        path: path.to_owned(),
        source,
    })?;
    let out = tokio::process::Command::new("sha256sum")
        .stdin(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| PullError::Hash {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.get(..64).unwrap_or_default();
    if !out.status.success()
        || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        || hex.len() != 64
    {
        return Err(PullError::Hash {
            path: path.to_owned(),
            why: format!(
                "{}: {}",
                out.status,
                sanitize::one_line(&String::from_utf8_lossy(&out.stderr), 512)
            ),
        });
    }
    Ok(hex.to_owned())
}

/// The private directory goes whatever happens: placed (the image has a second name),
/// failed or interrupted (partial files).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Private directories of pulls that never finished (a host crash, SIGKILL): ours to
/// remove (the update lock is held, so no pull of this service runs).
pub fn remove_stale(images: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(images) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".pull-")
            && e.file_type().is_ok_and(|t| t.is_dir())
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}
