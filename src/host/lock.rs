//! One supervisor per service name on this host, for the life of the process.
//!
//! `flock` on `<run dir>/<name>.lock` (local tmpfs, never the NFS-hosted service
//! directory). The kernel drops the lock when the process dies, so a crash never leaves a
//! stale lock; the file's content only names the holder for the refusal message. Both
//! `ood001.service` and `apptainer-supervisor@ood001.service` take the same lock.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open lock file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("service {name} is already supervised ({holder}); lock {path} is held")]
    Held {
        name: String,
        path: PathBuf,
        holder: String,
    },
}

/// Held for as long as it lives.
#[derive(Debug)]
pub struct ServiceLock {
    _file: File,
}

/// The lock file of service `name` (also listed by `check`).
pub fn path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.lock"))
}

pub fn acquire(run_dir: &Path, name: &str) -> Result<ServiceLock, LockError> {
    let path = path(run_dir, name);
    let open_err = |source| LockError::Open {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(run_dir).map_err(open_err)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(open_err)?;
    // flock(LOCK_EX | LOCK_NB): std's File::try_lock on Linux.
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim().replace('\n', ", ");
            return Err(LockError::Held {
                name: name.to_owned(),
                path,
                holder: if holder.is_empty() {
                    "holder unknown".into()
                } else {
                    holder
                },
            });
        }
        Err(std::fs::TryLockError::Error(err)) => return Err(open_err(err)),
    }
    let me = format!(
        "pid {}\nunit {}\n",
        std::process::id(),
        own_unit().unwrap_or_else(|| "none".into())
    );
    let _ = file
        .set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(me.as_bytes()));
    Ok(ServiceLock { _file: file })
}

/// The systemd unit this process runs in, from `/proc/self/cgroup`.
pub fn own_unit() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_from_cgroup(&text)
}

fn unit_from_cgroup(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.rsplit_once(':').map(|(_, p)| p))
        .flat_map(|p| p.split('/'))
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_read_from_cgroup() {
        assert_eq!(
            unit_from_cgroup("0::/system.slice/ood001.service\n").as_deref(),
            Some("ood001.service")
        );
        assert_eq!(
            unit_from_cgroup(
                "1:name=systemd:/system.slice/apptainer-supervisor@ood001.service\n0::/\n"
            )
            .as_deref(),
            Some("apptainer-supervisor@ood001.service")
        );
        assert_eq!(unit_from_cgroup("0::/\n"), None);
    }
}
