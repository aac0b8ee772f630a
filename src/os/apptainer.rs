//! The Apptainer boundary: where it keeps an instance's state file and logs, what that
//! file says, and running its CLI.
//!
//! We never move Apptainer's state (`APPTAINER_CONFIGDIR`): operators' `apptainer instance
//! list` and `apptainer exec instance://NAME` must keep finding the instance, so the path
//! is computed exactly as Apptainer computes it.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

/// `internal/pkg/instance/instance_linux.go`: `instances/<subdir>/<host>/<user>/<name>/`,
/// subdir `app` for Apptainer's native instances.
const APP_SUBDIR: &str = "app";

/// Apptainer's per-user config directory (`pkg/syfs/syfs.go` `ConfigDir`):
/// `$APPTAINER_CONFIGDIR` (legacy `$SINGULARITY_CONFIGDIR`), else `$HOME/.apptainer`,
/// else the passwd home of the current user.
pub fn config_dir(
    env: impl Fn(&str) -> Option<OsString>,
    passwd_home: impl FnOnce() -> Option<PathBuf>,
) -> PathBuf {
    for var in ["APPTAINER_CONFIGDIR", "SINGULARITY_CONFIGDIR"] {
        if let Some(d) = env(var).filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
    }
    let home = env("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(passwd_home)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".apptainer")
}

/// Where one instance's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePaths {
    /// `<cfg>/instances/app/<host>/<user>/<name>/` — removed as a whole on cleanup.
    pub dir: PathBuf,
    /// `<dir>/<name>.json`
    pub state_file: PathBuf,
    /// `<cfg>/instances/logs/<host>/<user>/<name>.err` (and `.out`)
    pub err_log: PathBuf,
    pub out_log: PathBuf,
}

impl InstancePaths {
    pub fn new(config_dir: &Path, host: &str, user: &str, name: &str) -> Self {
        let dir = config_dir
            .join("instances")
            .join(APP_SUBDIR)
            .join(host)
            .join(user)
            .join(name);
        let logs = config_dir
            .join("instances")
            .join("logs")
            .join(host)
            .join(user);
        InstancePaths {
            state_file: dir.join(format!("{name}.json")),
            dir,
            err_log: logs.join(format!("{name}.err")),
            out_log: logs.join(format!("{name}.out")),
        }
    }

    /// For the user and host this process runs as.
    pub fn for_current(name: &str) -> Self {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten();
        let cfg = config_dir(
            |k| std::env::var_os(k),
            || user.as_ref().map(|u| u.dir.clone()),
        );
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        let user = user.map_or_else(|| nix::unistd::getuid().to_string(), |u| u.name);
        InstancePaths::new(&cfg, &host, &user, name)
    }
}

/// The instance state file, as `internal/pkg/instance/instance_linux.go` (`type File`)
/// writes it. Only the fields we use; unknown ones are ignored so that a newer Apptainer
/// adding fields does not break us.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StateFile {
    /// The container's init, in the host PID namespace.
    pub pid: i32,
    /// The master (monitor) process that cleans up after the container.
    pub ppid: i32,
    pub name: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub ip: String,
    #[serde(rename = "logErrPath", default)]
    pub log_err_path: String,
    #[serde(rename = "logOutPath", default)]
    pub log_out_path: String,
    #[serde(default)]
    pub cgroup: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot read instance state file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: malformed instance state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl StateFile {
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// `Ok(None)` when there is no state file.
    pub fn read(path: &Path) -> Result<Option<Self>, StateError> {
        match std::fs::read_to_string(path) {
            Ok(t) => StateFile::parse(&t)
                .map(Some)
                .map_err(|source| StateError::Parse {
                    path: path.to_owned(),
                    source,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// What Apptainer's master calls itself: argv0 is `Apptainer instance: <user> [<name>]`
/// (`launcher_linux.go` prognameFormat). Apptainer's own ghost check uses this prefix.
pub const MASTER_CMDLINE_PREFIX: &[u8] = b"Apptainer instance";

/// The `Command` for an argv: program and arguments straight to execve, no shell.
pub fn command(argv: &[OsString], env: &[(OsString, OsString)]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().cloned())
        .stdin(Stdio::null());
    cmd
}

/// How much of a log's end [`log_tail`] reads: a log that grew for months, or one a
/// container floods, is never read whole.
const TAIL_BYTES: u64 = 16 * 1024;

/// The longest line [`log_tail`] quotes: the lines are the container's own words.
const TAIL_LINE: usize = 512;

/// The last `n` lines of a log file (the instance's `.err`), for messages: read from the
/// end, one per line, each with its control characters escaped (the
/// container writes this file; its text reaches the journal and a terminal).
pub fn log_tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut text = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .is_err()
        || f.take(TAIL_BYTES).read_to_end(&mut text).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| crate::os::sanitize::one_line(l, TAIL_LINE))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_reads_the_end_only_and_escapes_the_containers_words() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.err");
        // 1 MiB of old lines, then the last ones, one with a terminal escape and a CR.
        let mut text = "old line\n".repeat(128 * 1024);
        text.push_str("second last\nlast \x1b[2J\rforged\n");
        std::fs::write(&p, &text).unwrap();
        let tail = log_tail(&p, 2);
        // One line each, as the container wrote them, but no byte a terminal acts on.
        assert_eq!(tail, "second last\nlast \\x1b[2J\\rforged");
        assert!(!tail.contains('\x1b') && !tail.contains('\r'));
        assert_eq!(log_tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn config_dir_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(*v))
            }
        };
        let pw = || Some(PathBuf::from("/home/pw"));
        assert_eq!(
            config_dir(env(&[("APPTAINER_CONFIGDIR", "/c"), ("HOME", "/h")]), pw),
            PathBuf::from("/c")
        );
        assert_eq!(
            config_dir(env(&[("SINGULARITY_CONFIGDIR", "/s")]), pw),
            PathBuf::from("/s")
        );
        assert_eq!(
            config_dir(env(&[("HOME", "/h")]), pw),
            PathBuf::from("/h/.apptainer")
        );
        assert_eq!(
            config_dir(env(&[]), pw),
            PathBuf::from("/home/pw/.apptainer")
        );
    }

    #[test]
    fn root_paths_under_systemd() {
        let p = InstancePaths::new(Path::new("/root/.apptainer"), "core015", "root", "ood001");
        assert_eq!(
            p.state_file,
            Path::new("/root/.apptainer/instances/app/core015/root/ood001/ood001.json")
        );
        assert_eq!(
            p.err_log,
            Path::new("/root/.apptainer/instances/logs/core015/root/ood001.err")
        );
    }

    /// Shaped exactly as Apptainer writes it; see tests/fixtures/apptainer-state/SOURCE.md.
    #[test]
    fn parses_apptainer_state_fixture() {
        let text = include_str!("../../tests/fixtures/apptainer-state/ood001.json");
        let s = StateFile::parse(text).unwrap();
        assert_eq!(s.name, "ood001");
        assert!(s.pid > 0 && s.ppid > 0 && s.pid != s.ppid);
        assert!(s.log_err_path.ends_with("ood001.err"));
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let s = StateFile::parse(r#"{"pid":2,"ppid":1,"name":"a","futureField":{"x":1}}"#).unwrap();
        assert_eq!((s.pid, s.ppid), (2, 1));
    }
}
