//! The configuration's key names, in one place.
//!
//! The parser's error messages, the argv table, `check --json` and the man page test all
//! use these constants, so a key is spelled one way everywhere (firecracker's jailer keeps
//! its resource-limit names the same way).

pub const NAME: &str = "name";
pub const SERVICE_DIR: &str = "service_dir";
pub const IMAGE: &str = "image";
pub const IMAGE_URL: &str = "image_url";
pub const BOOT: &str = "boot";
pub const HOSTNAME: &str = "hostname";
pub const BINDS: &str = "binds";
pub const ENV_FILE: &str = "env_file";
pub const ENV: &str = "env";

pub const NETWORK: &str = "network";
pub const NETWORK_NAME: &str = "network.name";
pub const NETWORK_ARGS: &str = "network.args";
pub const NETWORK_TYPE: &str = "network.type";
pub const NETWORK_MASTER: &str = "network.master";
pub const NETWORK_MODE: &str = "network.mode";
pub const NETWORK_BRIDGE: &str = "network.bridge";
pub const NETWORK_MTU: &str = "network.mtu";
pub const NETWORK_MAC: &str = "network.mac";
pub const NETWORK_EXTERNAL: &str = "network.external";
pub const NETWORK_MANAGE: &str = "network.manage";
pub const NETWORK_IPAM_TYPE: &str = "network.ipam.type";
pub const NETWORK_IPAM_ADDRESSES: &str = "network.ipam.addresses";
pub const NETWORK_IPAM_GATEWAY: &str = "network.ipam.gateway";
pub const NETWORK_IPAM_ROUTES: &str = "network.ipam.routes";
pub const NETWORK_IPAM_SUBNET: &str = "network.ipam.subnet";
pub const NETWORK_IPAM_RANGE_START: &str = "network.ipam.range_start";
pub const NETWORK_IPAM_RANGE_END: &str = "network.ipam.range_end";
pub const NETWORK_IPAM_DATA_DIR: &str = "network.ipam.data_dir";

pub const OVERLAY: &str = "overlay";
pub const OVERLAY_PATH: &str = "overlay.path";
pub const OVERLAY_SIZE_MIB: &str = "overlay.size_mib";
pub const OVERLAY_SPARSE: &str = "overlay.sparse";
pub const OVERLAY_ALLOW_LOCAL_LOCKS: &str = "overlay.allow_local_locks";

pub const APPTAINER: &str = "apptainer";
pub const APPTAINER_BINARY: &str = "apptainer.binary";
pub const APPTAINER_EXTRA_ARGS: &str = "apptainer.extra_args";
pub const APPTAINER_NETWORK_DIR: &str = "apptainer.network_dir";

pub const READINESS: &str = "readiness";
pub const READINESS_MODE: &str = "readiness.mode";
pub const READINESS_REQUIRED_UNITS: &str = "readiness.required_units";
pub const READINESS_ACCEPT_DEGRADED: &str = "readiness.accept_degraded";
pub const READINESS_ON_FAILURE: &str = "readiness.on_failure";
pub const READINESS_MAX_RESTARTS: &str = "readiness.max_restarts";
pub const READINESS_RESTART_WINDOW_SEC: &str = "readiness.restart_window_sec";

pub const TIMEOUTS: &str = "timeouts";
pub const TIMEOUTS_START_SEC: &str = "timeouts.start_sec";
pub const TIMEOUTS_STOP_SEC: &str = "timeouts.stop_sec";
pub const TIMEOUTS_KILL_SEC: &str = "timeouts.kill_sec";
pub const TIMEOUTS_WATCHDOG_SEC: &str = "timeouts.watchdog_sec";
pub const TIMEOUTS_OVERLAY_CREATE_SEC: &str = "timeouts.overlay_create_sec";

pub const UNIT: &str = "unit";
pub const UNIT_DESCRIPTION: &str = "unit.description";
pub const UNIT_DOCUMENTATION: &str = "unit.documentation";
pub const UNIT_AFTER: &str = "unit.after";
pub const UNIT_BEFORE: &str = "unit.before";
pub const UNIT_WANTS: &str = "unit.wants";
pub const UNIT_REQUIRES: &str = "unit.requires";

pub const INSTALL: &str = "install";
pub const INSTALL_WANTED_BY: &str = "install.wanted_by";
pub const INSTALL_REQUIRED_BY: &str = "install.required_by";
pub const SECURITY: &str = "security";
pub const SECURITY_KEEP_CAPABILITIES: &str = "security.keep_capabilities";
pub const SECURITY_TRUSTED_OWNERS: &str = "security.trusted_owners";
pub const SECURITY_STRICT_PATHS: &str = "security.strict_paths";
pub const UPDATE: &str = "update";
pub const UPDATE_PROBATION_SEC: &str = "update.probation_sec";
pub const UPDATE_KEEP: &str = "update.keep";

/// Every key a service file may set, in the order the man page documents them.
/// `tests/docs.rs` fails when one of them is missing from
/// `man/apptainer-supervisor.toml.5`.
pub const ALL: &[&str] = &[
    NAME,
    SERVICE_DIR,
    IMAGE,
    IMAGE_URL,
    BOOT,
    HOSTNAME,
    BINDS,
    ENV_FILE,
    ENV,
    NETWORK_NAME,
    NETWORK_ARGS,
    NETWORK_TYPE,
    NETWORK_MASTER,
    NETWORK_MODE,
    NETWORK_BRIDGE,
    NETWORK_MTU,
    NETWORK_MAC,
    NETWORK_EXTERNAL,
    NETWORK_MANAGE,
    NETWORK_IPAM_TYPE,
    NETWORK_IPAM_ADDRESSES,
    NETWORK_IPAM_GATEWAY,
    NETWORK_IPAM_ROUTES,
    NETWORK_IPAM_SUBNET,
    NETWORK_IPAM_RANGE_START,
    NETWORK_IPAM_RANGE_END,
    NETWORK_IPAM_DATA_DIR,
    OVERLAY_PATH,
    OVERLAY_SIZE_MIB,
    OVERLAY_SPARSE,
    OVERLAY_ALLOW_LOCAL_LOCKS,
    APPTAINER_BINARY,
    APPTAINER_EXTRA_ARGS,
    APPTAINER_NETWORK_DIR,
    READINESS_MODE,
    READINESS_REQUIRED_UNITS,
    READINESS_ACCEPT_DEGRADED,
    READINESS_ON_FAILURE,
    READINESS_MAX_RESTARTS,
    READINESS_RESTART_WINDOW_SEC,
    TIMEOUTS_START_SEC,
    TIMEOUTS_STOP_SEC,
    TIMEOUTS_KILL_SEC,
    TIMEOUTS_WATCHDOG_SEC,
    TIMEOUTS_OVERLAY_CREATE_SEC,
    UNIT_DESCRIPTION,
    UNIT_DOCUMENTATION,
    UNIT_AFTER,
    UNIT_BEFORE,
    UNIT_WANTS,
    UNIT_REQUIRES,
    INSTALL_WANTED_BY,
    INSTALL_REQUIRED_BY,
    SECURITY_KEEP_CAPABILITIES,
    SECURITY_TRUSTED_OWNERS,
    SECURITY_STRICT_PATHS,
    UPDATE_PROBATION_SEC,
    UPDATE_KEEP,
];
