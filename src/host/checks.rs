//! Checks that depend on this host: do the image, bind sources, env file and apptainer
//! binary exist, is the overlay path usable, and does another service on this host claim
//! the same overlay. `check --host` and `run` both use them; plain `check` does not, so it
//! passes on any machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::canonical::canonical_path;
use super::paths;
use crate::config::keys;
use crate::config::{self, Service};

/// One host problem, already located (`file:line: key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIssue {
    pub at: String,
    pub reason: String,
}

/// The host problems, and what would only have been warned about, so that one run of
/// `check --host` lists every offender.
#[derive(Debug, thiserror::Error)]
#[error("{}{}", .issues.iter().map(|i| format!("{}: {}", i.at, i.reason)).collect::<Vec<_>>().join("\n"), .warnings.iter().map(|w| format!("\nwarning: {w}")).collect::<String>())]
pub struct HostError {
    pub issues: Vec<HostIssue>,
    pub warnings: Vec<String>,
}

/// What the env file yields, when it is read.
pub type EnvPairs = Vec<(String, String)>;

/// What a host check that passed found: the env file's variables, and what is allowed for
/// now but should be fixed (printed by `check --host`, logged at warning level by `run`).
#[derive(Debug, Default)]
pub struct Checked {
    pub env: EnvPairs,
    pub warnings: Vec<String>,
}

/// Runs every host check; returns the env file's variables and the warnings when all pass.
pub fn check(s: &Service, config_dir: &Path) -> Result<Checked, HostError> {
    let mut issues = Vec::new();
    let mut warnings = Vec::new();
    let mut push = |at: String, reason: String| issues.push(HostIssue { at, reason });

    let env_text = strict_modes(s, &mut push, &mut warnings);
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
            } else if let Some(e) = crate::host::overlay::Creation::refused_in(&dir) {
                // `run` would refuse to create it there; world-writable is refused above
                // already, by the path rule.
                if !matches!(e, crate::host::overlay::CreationError::SharedDir { mode, .. } if mode & 0o002 != 0)
                {
                    push(
                        s.locate(keys::OVERLAY_PATH),
                        format!("the overlay is missing and cannot be created: {e}"),
                    );
                }
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
    match super::mounts::overlay_verdict(&s.overlay.path) {
        super::mounts::Verdict::Fine => {}
        super::mounts::Verdict::LocalLocks(reason) if !s.overlay.allow_local_locks => {
            push(s.locate(keys::OVERLAY_PATH), reason);
        }
        super::mounts::Verdict::LocalLocks(reason) => warnings.push(format!(
            "{reason}\n  (accepted: {} = true)",
            keys::OVERLAY_ALLOW_LOCAL_LOCKS
        )),
        super::mounts::Verdict::Unchecked(w) => warnings.push(w),
    }
    let env = match env_text {
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
    warnings.extend(exposures(s, config_dir));
    if issues.is_empty() {
        Ok(Checked { env, warnings })
    } else {
        Err(HostError { issues, warnings })
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

/// The StrictModes rule ([`super::paths`]) for the service file, the env file, the image and
/// the overlay and every directory above them. The service file and the env file themselves
/// are refused when writable by group or others or owned by an untrusted uid, as ever; of
/// what is newly checked (the directories above, the image, the overlay) a world-writable one
/// is refused and a group-writable or untrusted-owner one only warned about, unless
/// `[security] strict_paths`. Returns the env file's text, read from the fd that was checked
/// (a missing default env file reads as empty), after checking that the service file read
/// the same way still says what `s` says.
fn strict_modes(
    s: &Service,
    push: &mut impl FnMut(String, String),
    warnings: &mut Vec<String>,
) -> std::io::Result<String> {
    let trusted = paths::trusted(&s.security);
    // A directory above several of the files is listed once, naming them all.
    let mut above: BTreeMap<(PathBuf, u8), (paths::Offender, bool, Vec<&str>)> = BTreeMap::new();
    let mut env_text = Ok(String::new());
    for (path, what) in [
        (&s.file, "service file"),
        (&s.env_file.path, "env file"),
        (&s.image, "image"),
        (&s.overlay.path, "overlay"),
    ] {
        let reads = matches!(what, "service file" | "env file");
        let walked = match what {
            "env file" => paths::walk_no_final_link(path, &trusted),
            "service file" => paths::walk(path, &trusted),
            _ => paths::walk_judge_only(path, &trusted),
        };
        let w = match walked {
            Ok(w) => w,
            Err(e) => {
                push(format!("{}", path.display()), format!("{what}: {e}"));
                continue;
            }
        };
        for o in w.offenders {
            if reads && w.file.is_some() && o.path == w.path {
                push(format!("{}", o.path.display()), file_fault(what, &o));
            } else {
                let rank = match o.fault {
                    paths::Fault::WorldWritable => 0,
                    paths::Fault::GroupWritable => 1,
                    paths::Fault::Owner(_) => 2,
                };
                let itself = o.path == w.path;
                above
                    .entry((o.path.clone(), rank))
                    .or_insert_with(|| (o, itself, Vec::new()))
                    .2
                    .push(what);
            }
        }
        let text = w.file.filter(|_| reads).map(read_small_file);
        match (what, text) {
            ("service file", Some(Ok(t))) => {
                if let Some(reason) = same_service(s, &t) {
                    push(format!("{}", s.file.display()), reason);
                }
            }
            ("service file", None) => push(
                format!("{}", s.file.display()),
                "service file vanished while it was checked".to_owned(),
            ),
            ("env file", Some(t)) => env_text = t,
            ("env file", None) => {
                env_text = Err(std::io::Error::from_raw_os_error(libc::ENOENT));
            }
            (_, Some(Err(e))) => push(format!("{}", path.display()), format!("{what}: {e}")),
            _ => {}
        }
    }
    for (o, itself, whats) in above.into_values() {
        let whats = match whats.split_last() {
            Some((last, [])) => format!("the {last}"),
            Some((last, rest)) => format!("the {} and the {last}", rest.join(", the ")),
            None => continue,
        };
        let kind = if itself {
            whats
        } else {
            format!("directory above {whats}")
        };
        let reason = format!(
            "{kind} {}: whoever can write it can change what runs as root\n  hint: {}",
            o.what(),
            o.fix()
        );
        let at = format!("{}", o.path.display());
        if o.fault == paths::Fault::WorldWritable || s.security.strict_paths {
            push(at, reason);
        } else {
            warnings.push(format!(
                "{at}: {reason}\n  (a warning for now: refused with [security] strict_paths = true, which will become the default)"
            ));
        }
    }
    env_text
}

/// The most a service file or an env file may hold: both are a screenful of settings.
const MAX_SETTINGS_FILE: u64 = 1024 * 1024;

/// The text of a file the walk opened (and checked), read from that descriptor: only a
/// regular file, and at most [`MAX_SETTINGS_FILE`] — `/dev/zero` or a FIFO named as an env
/// file would otherwise be read for ever.
fn read_small_file(f: std::fs::File) -> std::io::Result<String> {
    let data = crate::os::fsutil::read_regular(f, MAX_SETTINGS_FILE)?;
    String::from_utf8(data).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// The rule the service file and the env file themselves have always followed.
fn file_fault(what: &str, o: &paths::Offender) -> String {
    let p = o.path.display();
    match o.fault {
        paths::Fault::WorldWritable | paths::Fault::GroupWritable => format!(
            "{what} is writable by group or others (mode {:04o}): it decides what runs as root\n  hint: chmod go-w {p}",
            o.mode
        ),
        paths::Fault::Owner(uid) => format!(
            "{what} is owned by uid {uid}, not root: it decides what runs as root\n  hint: chown root {p}, or list {uid} in [security] trusted_owners if the file server shows root's files as {uid}"
        ),
    }
}

/// The binds of `s` that expose its own or another service's files (service directory, env
/// file, overlay) to the container, as warnings. A static fact, like [`claims`]: plain
/// `check` prints them too.
pub fn exposures(s: &Service, config_dir: &Path) -> Vec<String> {
    let others = other_services(config_dir, &s.name);
    super::exposure::bind_exposures(s, others.iter().map(|(o, _)| o))
}

/// Why the service file read through the checked fd is not the one `s` was loaded from, if
/// it is not: what runs must be what was checked.
fn same_service(s: &Service, text: &str) -> Option<String> {
    match config::parse(text, &s.file, Some(&s.name)) {
        Ok(again) if *super::canonicalize(&again) == *s => None,
        _ => Some(
            "service file changed while it was checked (read again through the checked file, it says something else): nothing is started\n  hint: run the command again once the file is in place".to_owned(),
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What runs must be what was checked: a service file that says something else when
    /// read again through the checked fd is refused.
    #[test]
    fn a_service_file_changed_since_loading_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("svc.toml");
        let text = "service_dir = \"/srv/svc\"\n";
        let s = config::parse(text, &file, None).unwrap();
        let s = super::super::canonicalize(&s);
        assert_eq!(same_service(&s, text), None);
        let reason = same_service(&s, "service_dir = \"/srv/elsewhere\"\n").unwrap();
        assert!(
            reason.starts_with("service file changed while it was checked"),
            "{reason}"
        );
    }
}
