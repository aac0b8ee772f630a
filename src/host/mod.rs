//! This host: where the service's paths really lead, whether the host can run it (files,
//! binaries, claims of other services), the supervisor's own privilege, the per-service
//! lock, the overlay image and the CNI configuration directory and its DEL.

mod canonical;
mod checks;
pub(crate) mod cni_del;
pub(crate) mod cni_dir;
mod exposure;
pub mod image_pointer;
pub(crate) mod lock;
pub mod mounts;
pub(crate) mod overlay;
mod overlay_creation;
pub mod overlay_lock;
mod paths;
pub mod privilege;
pub mod unit_names;

use canonical::canonical_dir_of;
pub use canonical::{canonical_path, canonicalize, Canonical};
pub use checks::{check, claims, exposures, Checked, EnvPairs, HostError, HostIssue};
pub use overlay::{read_superblock, Superblock, SuperblockError};
