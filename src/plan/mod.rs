//! The plan: what `run` will do for a service, as one value. `check` prints it (`--json`
//! serialises it) and `run` executes it, so what an operator sees is what runs. It is built
//! only from a [`Canonical`] service (host paths resolved), the same one the host checks
//! saw. [`argv`] holds the argv tables.

pub mod argv;
mod render;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

use crate::host::image_pointer::ImageSource;
use crate::host::{cni_dir, lock, privilege, Canonical, Checked};
use crate::os::apptainer::InstancePaths;
use crate::os::instance::RunRecord;
use crate::os::live;

pub use render::render_text;

/// A file `run` creates or uses.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PlannedFile {
    pub path: PathBuf,
    pub what: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Plan {
    pub name: String,
    pub file: PathBuf,
    /// Which file will run: the service file's `image`, a managed pointer or not
    /// (apptainer-supervisor(8), IMAGE POINTER). Read from names only, never hashed.
    pub image: ImageSource,
    /// The exact argv of `apptainer instance start`, argv[0] included: `run` executes this.
    #[serde(serialize_with = "lossy")]
    pub argv: Vec<OsString>,
    /// argv of `apptainer overlay create`, run only when the overlay is missing (`run` builds
    /// the image under the same name in a private temporary directory beside this path and
    /// moves it into place).
    #[serde(serialize_with = "lossy")]
    pub overlay_create: Vec<OsString>,
    pub files: Vec<PlannedFile>,
    /// The conflists `run` writes, by network name, as JSON.
    pub conflists: std::collections::BTreeMap<String, serde_json::Value>,
    pub host_checked: bool,
    /// Settings that are read but do nothing (`security.keep_capabilities`), with why, and
    /// what the host check allows for now but should be fixed (paths, binds).
    pub warnings: Vec<String>,
    /// What `run` sets in Apptainer's environment on top of its own (`container`, the env
    /// file, `[env]`). Not printed: an env file may hold secrets.
    #[serde(skip)]
    pub env: Vec<(String, String)>,
}

/// The service file holds UTF-8 only (TOML), so nothing is lost here in practice.
fn lossy<S: Serializer>(v: &[OsString], ser: S) -> Result<S::Ok, S::Error> {
    ser.collect_seq(v.iter().map(|a| a.to_string_lossy()))
}

impl Plan {
    /// The plan for `s`. `checked`: what the host checks found, the env file's variables
    /// and the warnings (`None`: the host was not checked, as by plain `check`).
    pub fn build(
        s: &Canonical,
        run_dir: &Path,
        paths: &InstancePaths,
        checked: Option<&Checked>,
    ) -> Plan {
        let env_file = checked.map(|c| c.env.as_slice());
        let env = argv::child_env(std::iter::empty(), env_file.unwrap_or_default(), s)
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        Plan {
            name: s.name.clone(),
            file: s.file.clone(),
            image: s.image_source().clone(),
            argv: argv::instance_start(s),
            overlay_create: argv::overlay_create(s, &s.overlay.path),
            files: files(s, run_dir, paths),
            conflists: s
                .networks
                .iter()
                .filter_map(|n| {
                    n.cni.as_ref().map(|c| {
                        let text = cni_dir::render(&s.name, n, c);
                        (
                            n.name.clone(),
                            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                        )
                    })
                })
                .collect(),
            host_checked: checked.is_some(),
            warnings: privilege::keep_capabilities_notice(s)
                .into_iter()
                .chain(checked.iter().flat_map(|c| c.warnings.iter().cloned()))
                .collect(),
            env,
        }
    }
}

/// Every file `run` writes or reads, each path from the function that `run` itself uses.
fn files(s: &Canonical, run_dir: &Path, paths: &InstancePaths) -> Vec<PlannedFile> {
    s.networks
        .iter()
        .map(|n| match n.cni {
            Some(_) => PlannedFile {
                path: cni_dir::path(&s.apptainer.network_dir, &n.name),
                what: "CNI conflist: written when its content changes, never over a file we did not write",
            },
            // Found by its "name" field, whatever its file name (libcni LoadConfList).
            None => PlannedFile {
                path: s.apptainer.network_dir.clone(),
                what: "CNI conflist of an external network (--network), found here by its \"name\": must exist, never written; its lease is released if the master dies",
            },
        })
        .chain([
            PlannedFile {
                path: s.overlay.path.clone(),
                what: "overlay image: created if missing, never modified or removed",
            },
            PlannedFile {
                path: lock::path(run_dir, &s.name),
                what: "lock held while the supervisor runs",
            },
            PlannedFile {
                path: RunRecord::path(run_dir, &s.name),
                what: "run record: container and master pid with start times",
            },
            PlannedFile {
                path: live::path(run_dir, &s.name),
                what: "live state file: phase, pids, status, for `status` and scripts",
            },
            PlannedFile {
                path: paths.state_file.clone(),
                what: "Apptainer's instance state file (written by Apptainer, read here, never moved)",
            },
            PlannedFile {
                path: paths.out_log.clone(),
                what: "Apptainer's instance stdout log (forwarded to the journal)",
            },
            PlannedFile {
                path: paths.err_log.clone(),
                what: "Apptainer's instance stderr log (forwarded to the journal)",
            },
        ])
        .collect()
}
