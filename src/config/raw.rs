//! The service file as serde reads it (`deny_unknown_fields`, values kept as
//! [`toml::Spanned`] so a later check can still point at a line).

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Option<Spanned<String>>,
    pub(super) service_dir: Spanned<String>,
    pub(super) image: Option<Spanned<String>>,
    pub(super) image_url: Option<Spanned<String>>,
    #[serde(default = "yes")]
    pub(super) boot: bool,
    pub(super) hostname: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) binds: Vec<Spanned<String>>,
    pub(super) env_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    pub(super) network: Vec<RawNetwork>,
    #[serde(default)]
    pub(super) overlay: RawOverlay,
    #[serde(default)]
    pub(super) apptainer: RawApptainer,
    #[serde(default)]
    pub(super) readiness: RawReadiness,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) unit: RawUnit,
    #[serde(default)]
    pub(super) install: RawInstall,
    #[serde(default)]
    pub(super) security: RawSecurity,
    #[serde(default)]
    pub(super) update: RawUpdate,
}

pub(super) fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) args: Vec<Spanned<String>>,
    #[serde(rename = "type")]
    pub(super) kind: Option<Spanned<CniKind>>,
    pub(super) master: Option<Spanned<String>>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) bridge: Option<Spanned<String>>,
    pub(super) mtu: Option<Spanned<u32>>,
    pub(super) mac: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) external: bool,
    #[serde(default)]
    pub(super) manage: bool,
    pub(super) ipam: Option<Spanned<RawIpam>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIpam {
    #[serde(rename = "type")]
    pub(super) kind: Spanned<String>,
    #[serde(default)]
    pub(super) addresses: Vec<Spanned<String>>,
    pub(super) gateway: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) routes: Vec<Spanned<String>>,
    pub(super) subnet: Option<Spanned<String>>,
    pub(super) range_start: Option<Spanned<String>>,
    pub(super) range_end: Option<Spanned<String>>,
    pub(super) data_dir: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOverlay {
    pub(super) path: Option<Spanned<String>>,
    pub(super) size_mib: Option<Spanned<u64>>,
    pub(super) sparse: Option<bool>,
    pub(super) allow_local_locks: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApptainer {
    pub(super) binary: Option<Spanned<String>>,
    pub(super) network_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) extra_args: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReadiness {
    pub(super) mode: Option<Spanned<ReadinessMode>>,
    #[serde(default)]
    pub(super) required_units: Vec<Spanned<String>>,
    pub(super) accept_degraded: Option<bool>,
    pub(super) on_failure: Option<OnFailure>,
    pub(super) max_restarts: Option<u32>,
    pub(super) restart_window_sec: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) start_sec: Option<Spanned<u64>>,
    pub(super) stop_sec: Option<Spanned<u64>>,
    pub(super) kill_sec: Option<Spanned<u64>>,
    pub(super) watchdog_sec: Option<Spanned<u64>>,
    pub(super) overlay_create_sec: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpdate {
    pub(super) probation_sec: Option<Spanned<u64>>,
    pub(super) keep: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUnit {
    pub(super) description: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) documentation: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) after: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) before: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) wants: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) requires: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInstall {
    #[serde(default)]
    pub(super) wanted_by: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) required_by: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecurity {
    #[serde(default)]
    pub(super) keep_capabilities: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) trusted_owners: Vec<Spanned<i64>>,
    pub(super) strict_paths: Option<bool>,
}

// ---------------------------------------------------------------------------------------
// Loading
