//! Step 4 of a run: `apptainer instance start` from an argv (no shell); on success the state
//! file names the container init and the master, which are recorded with their start
//! times and watched through pidfds.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{error, info};

use super::child::{describe, CliResult};
use super::leftovers::is_master_of;
use super::report::Notice;
use super::{os, Supervisor, Tracked};
use crate::exit::RunError;
use crate::os::apptainer::{self, StateFile};
use crate::os::instance::{self, ProcId, RunRecord};
use crate::os::live::{self, Phase};

impl Supervisor<'_> {
    /// Starts the instance. `Ok(None)`: a stop was noted while the CLI ran and the
    /// half-started instance was stopped.
    pub(super) async fn start(&mut self) -> Result<Option<Tracked>, RunError> {
        let argv = self.plan.argv.clone();
        // The digest of a managed image, read from its name when the plan was made: what
        // this start runs, whatever the pointer says later ("-" when unmanaged).
        let digest = self.plan.image.digest().map(str::to_owned);
        info!(
            PHASE = "starting-instance",
            IMAGE_DIGEST = digest.as_deref().unwrap_or("-"),
            argv = ?argv,
            "starting instance"
        );
        self.report(
            Notice::Status,
            Some(Phase::StartingInstance),
            "starting instance",
        );
        let p = &self.ctx.paths;
        self.log_start = crate::os::output::Start::now(&p.out_log, &p.err_log);
        self.started_at = Instant::now();
        self.live.update(|s| {
            s.started_at = Some(live::unix_now());
            s.image_digest = digest;
        });
        // Apptainer writes why the container could not be created (a network ADD, a bind,
        // an overlay, the starter's capability check) to the instance's .err log and echoes
        // it on stderr (1.4) or stdout (1.3, discarded): keep where the log ends now, to
        // quote what this start adds when stderr does not (see `start_log_part`).
        let err_log_len = std::fs::metadata(&self.ctx.paths.err_log).map_or(0, |m| m.len());
        let deadline = self.started_at + Duration::from_secs(self.s.timeouts.start_sec);
        let out = self
            .run_cli(&argv, Some(Duration::from_secs(30)), Some(deadline))
            .await;
        // A stop request while the CLI ran was noted by the loop; the CLI was left to finish.
        let stop_requested = self.signals.stop_noted();
        let out = if stop_requested { None } else { Some(out?) };
        match out {
            Some(CliResult::Done(status, stderr)) if !status.success() => {
                error!(exit = %describe(status), stderr = %stderr.trim_end(), "apptainer instance start failed");
                self.cleanup_failed_start().await;
                let added = log_since(&self.ctx.paths.err_log, err_log_len);
                return Err(RunError::StartInstance {
                    status: describe(status),
                    stderr: stderr.trim_end().to_owned(),
                    log: start_log_part(&stderr, &added, &self.ctx.paths.err_log),
                });
            }
            Some(CliResult::TimedOut { .. }) => {
                self.cleanup_failed_start().await;
                return Err(RunError::StartTimeout {
                    secs: self.s.timeouts.start_sec,
                });
            }
            _ => {}
        }
        if stop_requested {
            // The CLI was left to finish so that nothing half-made is left; now undo it.
            self.cleanup_failed_start().await;
            return Ok(None);
        }
        match self.adopt() {
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                // E.g. the run record could not be written (a full /run): an instance we
                // cannot track must not outlive us.
                error!(error = %e, "cannot take over the started instance; stopping it");
                self.cleanup_failed_start().await;
                Err(e)
            }
        }
    }

    /// After `instance start` returned 0: read the state file, check the master, record
    /// both processes, open their pidfds.
    pub(super) fn adopt(&mut self) -> Result<Tracked, RunError> {
        let path = &self.ctx.paths.state_file;
        let st =
            StateFile::read(path)?.ok_or_else(|| RunError::NoStateFile { path: path.clone() })?;
        // Apptainer records the first address of the first network (pkg/network); without
        // one, look in the container's own network namespace.
        self.ip = if st.ip.is_empty() {
            crate::host::cni_dir::container_ip(st.pid).unwrap_or_default()
        } else {
            st.ip.clone()
        };
        let cmdline = instance::cmdline(st.ppid).unwrap_or_default();
        if !cmdline.starts_with(apptainer::MASTER_CMDLINE_PREFIX) {
            return Err(RunError::NotAMaster {
                ppid: st.ppid,
                path: path.clone(),
                cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
            });
        }
        let gone = |what: &str| RunError::Os {
            what: format!("{what} exited right after start"),
            source: io::Error::from_raw_os_error(libc::ESRCH),
        };
        let container = ProcId::of(st.pid).ok_or_else(|| gone("the container"))?;
        let master = ProcId::of(st.ppid).ok_or_else(|| gone("the master"))?;
        let container_fd = instance::watch(&container).map_err(os("pidfd_open(container)"))?;
        let master_fd = instance::watch(&master).map_err(os("pidfd_open(master)"))?;
        RunRecord {
            name: self.s.name.clone(),
            container,
            master,
            state_file: path.clone(),
            overlay: self.s.overlay.path.clone(),
            supervisor_pid: std::process::id(),
        }
        .write(&self.record_path)
        .map_err(os(format!("writing {}", self.record_path.display())))?;
        tracing::Span::current().record("INSTANCE_PID", container.pid);
        let ip = self.ip.clone();
        self.live.update(|s| {
            s.instance = Some(container);
            s.master = Some(master);
            s.ip = ip;
        });
        Ok(Tracked {
            container,
            master,
            container_fd,
            master_fd,
        })
    }

    /// A start that failed or was interrupted may have left an instance behind (the CLI
    /// timed out, or SIGTERM came while it worked): stop what is there.
    pub(super) async fn cleanup_failed_start(&mut self) {
        if let Ok(Some(st)) = StateFile::read(&self.ctx.paths.state_file) {
            if let (Some(c), true) = (ProcId::of(st.pid), is_master_of(st.ppid, &self.s.name)) {
                let m = ProcId::of(st.ppid);
                if let Ok(cfd) = instance::watch(&c) {
                    let mfd = m.and_then(|m| instance::watch(&m).ok());
                    self.halt(&c, &cfd, m.as_ref(), mfd.as_ref(), None).await;
                }
            }
        }
        self.remove_leftovers();
    }
}

/// What was appended to `path` after byte `from` (at most its last 16 KiB), trimmed, each
/// line escaped.
pub(super) fn log_since(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    let read = std::fs::File::open(path).and_then(|mut f| {
        let end = f.metadata()?.len();
        // A log rotated or truncated in between is read from its start.
        let from = if end < from { 0 } else { from };
        f.seek(SeekFrom::Start(from.max(end.saturating_sub(16 * 1024))))?;
        f.take(16 * 1024).read_to_end(&mut buf)
    });
    match read {
        // The container writes this log: quoted line by line, escaped.
        Ok(_) => crate::os::sanitize::lines(String::from_utf8_lossy(&buf).trim(), 1024),
        Err(_) => String::new(),
    }
}

/// The `log` part of [`RunError::StartInstance`]: what this start added to the `.err` log
/// (`added`), quoted once. After a failed start Apptainer echoes those lines itself
/// (`starterInstance`): on stdout up to 1.3 (internal/pkg/runtime/launch/launcher_linux.go:1253
/// at v1.3.6, `fmt.Println`), which the supervisor discards, so they are quoted from the
/// log; on stderr since 1.4 (launcher_linux.go:1254 at v1.4.5, `fmt.Fprintln(os.Stderr, ...)`),
/// already in the message, so only the log's path is named.
fn start_log_part(stderr: &str, added: &str, err_log: &Path) -> String {
    if added.is_empty() {
        String::new()
    } else if stderr.contains(added) {
        format!("\n(Apptainer quoted {} above)", err_log.display())
    } else {
        format!("\n{}:\n{added}", err_log.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_since_reads_only_what_this_start_added() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("x.err");
        std::fs::write(&log, "old run\n").unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        std::fs::write(&log, "old run\nFATAL:   network setup failed\n").unwrap();
        assert_eq!(log_since(&log, from), "FATAL:   network setup failed");
        assert_eq!(
            log_since(&log, 10_000),
            "old run\nFATAL:   network setup failed"
        );
        assert_eq!(log_since(&d.path().join("none"), 0), "");
    }

    #[test]
    fn a_failed_starts_log_is_quoted_once() {
        let log = Path::new("/root/.apptainer/instances/logs/h/root/x.err");
        let added = "ABORT  : Requesting capability set 0x1 while permitted capability set is 0x0";
        // 1.3: the log went to stdout (discarded), stderr has only Apptainer's own error.
        let v13 = "FATAL:   while executing starter: failed to start instance: exit status 255\n";
        assert_eq!(
            start_log_part(v13, added, log),
            format!("\n{}:\n{added}", log.display())
        );
        // 1.4: stderr has the log's lines (and a blank line) before its own error.
        let v14 = format!("{added}\n\n{v13}");
        let part = start_log_part(&v14, added, log);
        assert_eq!(
            part,
            format!("\n(Apptainer quoted {} above)", log.display())
        );
        assert_eq!(
            format!("{v14}{part}")
                .matches("Requesting capability set")
                .count(),
            1
        );
        assert_eq!(start_log_part(v13, "", log), "");
    }
}
