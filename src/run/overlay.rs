//! Step 3 of a run: the overlay image is created if missing (never touched otherwise) and
//! must not be attached to a loop device already.

use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::child::{describe, CliResult};
use super::event_loop::{self, Waits, Wake};
use super::report::Notice;
use super::{os, Supervisor};
use crate::exit::RunError;
use crate::host::overlay;
use crate::os::live::Phase;
use crate::plan::argv;

impl Supervisor<'_> {
    pub(super) async fn ensure_overlay(&mut self) -> Result<(), RunError> {
        let path = &self.s.overlay.path;
        // A creation interrupted by a crash or SIGKILL left its temporary; we hold the
        // service lock, so no other run is creating it now.
        match overlay::remove_stale_temps(path) {
            Ok(removed) => {
                for t in removed {
                    info!(overlay = %path.display(), temporary = %t.display(), "removed the temporary of an interrupted overlay creation");
                }
            }
            Err(e) => {
                warn!(overlay = %path.display(), error = %e, "cannot clear temporaries of an interrupted overlay creation")
            }
        }
        match overlay::inspect(path).map_err(os(format!("inspecting {}", path.display())))? {
            overlay::Found::NotAFile(what) => {
                return Err(RunError::OverlayNotAFile {
                    path: path.clone(),
                    what,
                })
            }
            overlay::Found::Image { .. } => {
                // The claim before the loop check: the lock knows other hosts, sysfs only
                // this one.
                self.claim_overlay().await?;
                if let Some(device) = overlay::attached_loop(path) {
                    return Err(RunError::OverlayInUse {
                        path: path.clone(),
                        device,
                    });
                }
                self.check_superblock(path)?;
                return Ok(());
            }
            overlay::Found::Missing => {}
        }
        info!(overlay = %path.display(), size_mib = self.s.overlay.size_mib, "creating overlay image");
        let status = format!(
            "creating overlay {} ({} MiB)",
            path.display(),
            self.s.overlay.size_mib
        );
        self.report(Notice::Status, Some(Phase::CreatingOverlay), &status);
        // Built in a private directory beside the target and moved into place only when
        // complete (host::overlay::Creation): a stop, a crash or a full disk never leaves a
        // truncated overlay.img, and no link planted beside it is followed. The directory
        // goes when `creation` is dropped, on every way out.
        let creation =
            overlay::Creation::begin(path).map_err(|source| RunError::OverlayCreation {
                path: path.clone(),
                source,
            })?;
        let argv = argv::overlay_create(self.s, &creation.temp_image());
        // mkfs of a large image can outlast the start timeout: keep asking for more, up to
        // the creation's own deadline, which scales with the size. A stop kills it at once:
        // what it made is never published then.
        let extend = Duration::from_secs(30);
        let limit = self.s.timeouts.overlay_create(self.s.overlay.size_mib);
        let deadline = Instant::now() + limit;
        let out = match self.run_cli_abandoning(&argv, Some(extend), deadline).await {
            // A stop request while mkfs ran: the new image is not kept half-trusted, and
            // the run ends where `main` looks at the noted stop, right after this.
            Ok(_) if self.signals.stop_noted() => return Ok(()),
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        match out {
            CliResult::Done(status, _) if status.success() => {
                if let Err(source) = creation.publish() {
                    return Err(RunError::OverlayCreation {
                        path: path.clone(),
                        source,
                    });
                }
                info!(overlay = %path.display(), "overlay image created");
                self.claim_overlay().await
            }
            CliResult::Done(status, stderr) => Err(RunError::CreateOverlay {
                path: path.clone(),
                status: describe(status),
                stderr,
            }),
            CliResult::TimedOut { exited } => Err(RunError::CreateOverlayTimeout {
                path: path.clone(),
                secs: limit.as_secs(),
                abandoned: !exited,
            }),
        }
    }

    /// Takes the supervisor's claim on the overlay (see [`crate::host::overlay_lock`]),
    /// held until the run ends: a second host's start is refused naming this one. The
    /// lock calls run on a thread of their own, bounded by `timeouts.start_sec`: on a
    /// cut-off NFS client they hang. A stop meanwhile abandons the claim (noted for
    /// `main`, which ends the run before anything starts).
    async fn claim_overlay(&mut self) -> Result<(), RunError> {
        let path = self.s.overlay.path.clone();
        let (name, allow) = (self.s.name.clone(), self.s.overlay.allow_local_locks);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let p = path.clone();
        // A claim that comes after we gave up is dropped with the failed send: its fd
        // closes and its record goes.
        std::thread::spawn(move || {
            let _ = tx.send(crate::host::overlay_lock::claim(&p, &name, allow));
        });
        let secs = self.s.timeouts.start_sec;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut rx = std::pin::pin!(rx);
        loop {
            let waits = Waits {
                call: Some(rx.as_mut()),
                at: Some(deadline),
                ..Waits::default()
            };
            match event_loop::next(&mut self.signals, waits).await {
                Wake::Done(Ok(claim)) => {
                    self.claim = claim?;
                    return Ok(());
                }
                Wake::Done(Err(_)) => {
                    return Err(RunError::Os {
                        what: format!("taking the lock on {}", path.display()),
                        source: std::io::Error::other("the lock thread ended without an answer"),
                    })
                }
                Wake::Deadline => return Err(RunError::ClaimTimeout { path, secs }),
                Wake::Signal(sig) => {
                    self.signals.note(sig, "the overlay's lock was taken");
                    return Ok(());
                }
                _ => {}
            }
        }
    }

    /// Refuses an existing image whose superblock is broken (never recreating it); warns
    /// when it is over 90% full or was not cleanly unmounted without a journal.
    pub(super) fn check_superblock(&self, path: &Path) -> Result<(), RunError> {
        let sb = overlay::read_superblock(path)
            .map_err(|source| RunError::OverlayUnusable { source })?;
        let fill = sb.fill_percent();
        if fill > 90.0 {
            warn!(
                overlay = %path.display(),
                fill_percent = format!("{fill:.1}"),
                blocks_count = sb.blocks_count,
                free_blocks = sb.free_blocks,
                block_size = sb.block_size,
                "the overlay image is over 90% full"
            );
        }
        if sb.needs_recovery {
            // Also what a crash leaves and what a live mount elsewhere looks like: only a
            // hint, after the claim said nobody holds it.
            info!(overlay = %path.display(), "the overlay's journal needs recovery (a crash, or a host that lost it while mounted); the kernel replays it at mount");
        }
        if overlay::unclean_without_journal(path) {
            warn!(overlay = %path.display(), "the overlay has no journal and was not cleanly unmounted; the kernel mounts it unchecked");
        }
        Ok(())
    }
}
