//! Thin wrappers over the world the supervisor talks to: Apptainer's CLI and files
//! ([`apptainer`]), the processes it tracks ([`instance`]: pidfds, subreaper, signals), the
//! host's systemd ([`notify`], and as `update` drives it, [`host_systemd`]), journald ([`journal`], [`output`]), the container's own
//! systemd ([`inner`]), paths resolved inside the container's root ([`in_root`]), crash-safe
//! file writes ([`fsutil`]) and the checked form of text that may come from inside the
//! container ([`sanitize`]). None of them decides anything; `run` does.

pub(crate) mod apptainer;
pub(crate) mod fsutil;
pub(crate) mod host_systemd;
pub(crate) mod in_root;
pub(crate) mod inner;
pub(crate) mod instance;
pub(crate) mod journal;
pub(crate) mod live;
pub(crate) mod notify;
pub(crate) mod output;
pub(crate) mod sanitize;

pub use apptainer::InstancePaths;
pub use fsutil::write_atomic;
pub use instance::{ProcId, RunRecord};
