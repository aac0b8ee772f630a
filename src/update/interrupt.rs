//! The interrupts an operator sends an `update` (SIGINT from Ctrl-C, SIGTERM), seen by
//! every wait of it. Before the stop an interrupt ends the update with nothing switched
//! (a running pull's process group is killed at once: SIGKILL, since the private
//! directory is ours to remove and Apptainer's own clean-up would not run on SIGTERM
//! anyway, Go's default action); after it, the update rolls back first. SIGHUP (the
//! terminal went away, an ssh session dropped) is not an interrupt: the update carries on
//! to its end, its steps in the journal.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

pub struct Interrupt {
    fired: AtomicBool,
    /// The process group of the running pull (0: none).
    child_group: AtomicI32,
    notify: tokio::sync::Notify,
}

impl Interrupt {
    pub(super) fn new() -> Arc<Interrupt> {
        Arc::new(Interrupt {
            fired: AtomicBool::new(false),
            child_group: AtomicI32::new(0),
            notify: tokio::sync::Notify::new(),
        })
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    pub(super) fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
        self.kill_group();
    }

    fn kill_group(&self) {
        let group = self.child_group.load(Ordering::SeqCst);
        if group > 0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The pull's process group from now on (0: none). An interrupt that came before the
    /// group was known kills it here.
    pub(super) fn set_group(&self, group: i32) {
        self.child_group.store(group, Ordering::SeqCst);
        if group > 0 && self.fired() {
            self.kill_group();
        }
    }

    async fn wait(&self) {
        let n = self.notify.notified();
        if self.fired() {
            return;
        }
        n.await;
    }

    /// `f`, or `None` when an interrupt comes first.
    pub(super) async fn or<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        let f = std::pin::pin!(f);
        let w = std::pin::pin!(self.wait());
        match futures_util::future::select(f, w).await {
            futures_util::future::Either::Left((v, _)) => Some(v),
            futures_util::future::Either::Right(_) => None,
        }
    }
}
