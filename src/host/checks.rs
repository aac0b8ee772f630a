//! Checks that depend on this host: do the image, bind sources, env file and apptainer
//! binary exist, is the overlay path usable, and does another service on this host claim
//! the same overlay. `check --host` and `run` both use them; plain `check` does not, so it
//! passes on any machine.

use std::path::{Path, PathBuf};

use super::canonical::canonical_path;
use crate::config::keys;
use crate::config::{self, Service};

/// One host problem, already located (`file:line: key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIssue {
    pub at: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{}", .issues.iter().map(|i| format!("{}: {}", i.at, i.reason)).collect::<Vec<_>>().join("\n"))]
pub struct HostError {
    pub issues: Vec<HostIssue>,
}

/// What the env file yields, when it is read.
pub type EnvPairs = Vec<(String, String)>;

/// Runs every host check; returns the env file's variables when all pass.
pub fn check(s: &Service, config_dir: &Path) -> Result<EnvPairs, HostError> {
    let mut issues = Vec::new();
    let mut push = |at: String, reason: String| issues.push(HostIssue { at, reason });

    // The service file and its env file decide what runs as root: they must not be
    // writable by anyone else (nor owned by another user, when we are root).
    for (path, what) in [(&s.file, "service file"), (&s.env_file.path, "env file")] {
        if let Some(reason) = unsafe_file(path) {
            push(format!("{}", path.display()), format!("{what} {reason}"));
        }
    }
    if !s.image.exists() {
        push(
            s.locate(keys::IMAGE),
            format!("image {} does not exist", s.image.display()),
        );
    }
    if !is_executable(&s.apptainer.binary) {
        push(
            s.locate(keys::APPTAINER_BINARY),
            format!("{} is not an executable file", s.apptainer.binary.display()),
        );
    }
    for b in &s.binds {
        if !b.src.exists() {
            push(
                format!(
                    "{}:{}:{}: {}",
                    s.file.display(),
                    b.line,
                    b.column,
                    keys::BINDS
                ),
                format!(
                    "bind source {} does not exist on this host (bind {:?})\n  hint: create it, or remove the bind",
                    b.src.display(),
                    b.spec()
                ),
            );
        }
    }
    match crate::host::overlay::inspect(&s.overlay.path) {
        Ok(crate::host::overlay::Found::NotAFile(what)) => push(
            s.locate(keys::OVERLAY_PATH),
            format!(
                "{} exists but is {what}; it is left untouched",
                s.overlay.path.display()
            ),
        ),
        Ok(crate::host::overlay::Found::Missing) => {
            let dir = crate::host::overlay::parent_dir(&s.overlay.path);
            if !dir.is_dir() {
                push(
                    s.locate(keys::OVERLAY_PATH),
                    format!(
                        "the overlay is missing and its directory {} does not exist",
                        dir.display()
                    ),
                );
            }
        }
        Ok(crate::host::overlay::Found::Image { .. }) => {}
        Err(e) => push(
            s.locate(keys::OVERLAY_PATH),
            format!("{}: {e}", s.overlay.path.display()),
        ),
    }
    if let Some(reason) = read_only_overlay_fs(&s.overlay.path) {
        push(s.locate(keys::OVERLAY_PATH), reason);
    }
    let env = match std::fs::read_to_string(&s.env_file.path) {
        Ok(text) => match config::parse_env_file_lines(&text) {
            Ok(env) => env
                .into_iter()
                .filter_map(|(line, k, v)| match config::state_dir_env(&k) {
                    Some(reason) => {
                        push(
                            format!("{}:{line}: {k}", s.env_file.path.display()),
                            format!("{reason}\n  hint: {}", config::STATE_DIR_ENV_HINT),
                        );
                        None
                    }
                    None => Some((k, v)),
                })
                .collect(),
            Err((line, reason)) => {
                push(format!("{}:{line}", s.env_file.path.display()), reason);
                Vec::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !s.env_file.explicit => Vec::new(),
        Err(e) => {
            push(
                s.locate(keys::ENV_FILE),
                format!("{}: {e}", s.env_file.path.display()),
            );
            Vec::new()
        }
    };
    let at_network = |e: &crate::host::cni_dir::NetworkError| {
        let line = e
            .network()
            .and_then(|name| s.networks.iter().find(|n| n.name == name))
            .map(|n| n.line);
        match line {
            Some(l) => format!("{}:{l}: network", s.file.display()),
            None => format!("{}: network", s.file.display()),
        }
    };
    if let Err(e) = crate::host::cni_dir::check_parents(s) {
        push(at_network(&e), e.to_string());
    }
    if let Err(e) = crate::host::cni_dir::dry_run(s) {
        push(at_network(&e), e.to_string());
    }
    issues.extend(claims(s, config_dir));
    if issues.is_empty() {
        Ok(env)
    } else {
        Err(HostError { issues })
    }
}

/// What this service claims that another service in the config directory claims too: a
/// static address, a conflist (network name) or the overlay. Needs no host state beyond the
/// other service files, so plain `check` runs it as well.
pub fn claims(s: &Service, config_dir: &Path) -> Vec<HostIssue> {
    let mut issues = Vec::new();
    let mut push = |at: String, reason: String| issues.push(HostIssue { at, reason });
    let others = other_services(config_dir, &s.name);
    for (ip, mine, theirs) in
        crate::host::cni_dir::address_conflicts(s, others.iter().map(|(o, _)| o))
    {
        push(
            format!("{}: network.ipam.addresses", s.file.display()),
            format!("{ip} of network {mine} is also claimed by service {theirs}"),
        );
    }
    for (other, file) in &others {
        for n in s.networks.iter().filter(|n| n.cni.is_some()) {
            if other
                .networks
                .iter()
                .any(|o| o.name == n.name && o.cni.is_some())
            {
                push(
                    format!("{}:{}: network.name", s.file.display(), n.line),
                    format!(
                        "network {} is also written by service {} ({}); each service owns its conflist",
                        n.name,
                        other.name,
                        file.display()
                    ),
                );
            }
        }
    }
    let mine = canonical_path(&s.overlay.path);
    for (other, file) in others {
        // Compared resolved: one service may name the image through a symlinked directory
        // (common on NFS) and the other through its real path.
        if canonical_path(&other.overlay.path) == mine {
            push(
                s.locate(keys::OVERLAY_PATH),
                format!(
                    "{} is also the overlay of service {} ({}); an overlay must never be mounted twice",
                    s.overlay.path.display(),
                    other.name,
                    file.display()
                ),
            );
        }
    }
    issues
}

/// Why a file that configures a root process is unsafe, if it is: writable by group or
/// others, or (when we run as root) owned by another user. A missing file is not unsafe.
fn unsafe_file(p: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    let mode = m.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!(
            "is writable by group or others (mode {mode:04o}): it decides what runs as root\n  hint: chmod go-w {}",
            p.display()
        ));
    }
    if nix::unistd::geteuid().is_root() && m.uid() != 0 {
        return Some(format!(
            "is owned by uid {}, not root: it decides what runs as root\n  hint: chown root {}",
            m.uid(),
            p.display()
        ));
    }
    None
}

/// Apptainer does not fail on a writable overlay it cannot write: it mounts it read-only
/// and goes on (prepare_linux.go `loadOverlayImages`: v1.3.6:1282-1290 silently,
/// v1.4.5:1373-1381 with a WARNING), so the service would run and keep nothing it writes.
/// Refused here instead, while a person can still fix the mount.
fn read_only_overlay_fs(overlay: &Path) -> Option<String> {
    // The image, or the directory it is to be created in.
    let at = if overlay.exists() {
        overlay.to_path_buf()
    } else {
        crate::host::overlay::parent_dir(overlay)
    };
    let st = nix::sys::statvfs::statvfs(&at).ok()?;
    st.flags()
        .contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
        .then(|| {
            format!(
                "{} is on a file system mounted read-only: Apptainer would mount the overlay read-only and nothing the container writes would be kept\n  hint: remount it read-write, or set overlay.path to a writable file system",
                at.display()
            )
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The other services configured in `dir` that parse (a broken neighbour is its own
/// service's problem, reported when that one is checked).
fn other_services(dir: &Path, me: &str) -> Vec<(Service, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") && p.file_stem().is_some_and(|n| n != me) {
            if let Ok(s) = config::load(&p, None) {
                if s.name != me {
                    out.push((s, p));
                }
            }
        }
    }
    out
}
