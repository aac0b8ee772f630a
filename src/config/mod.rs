//! Service files: TOML in, a validated [`Service`] out.
//!
//! One file per service (`/etc/apptainer-supervisor/<name>.toml`). Parsing happens in two
//! steps: serde reads the text into the `Raw*` structs of [`raw`] (`deny_unknown_fields`,
//! values kept as [`toml::Spanned`] so a later check can still point at a line), then
//! [`validate`] turns them into a [`Service`] with every path absolute and every default
//! filled in, collecting all problems ([`issue`]: `file:line:col: key` and a caret) before
//! it gives up. [`rules`] holds the rules single values follow, [`env_file`] the env file's
//! syntax, [`keys`] every key's name. Nothing here touches the host: checks that need the
//! host (does the image exist?) live in [`crate::host`].

mod env_file;
mod issue;
pub mod keys;
mod raw;
mod rules;
#[cfg(test)]
mod tests;
mod validate;

pub use env_file::*;
pub use issue::*;
use raw::*;
pub use rules::*;
use validate::*;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Apptainer's network name for "a network namespace with no CNI network in it" (`run`
/// passes it when the service names no network; a `[[network]]` may not take it).
pub const NO_NETWORK: &str = "none";

/// Where `run NAME` and `check NAME` look for `NAME.toml`.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/apptainer-supervisor";
pub const DEFAULT_APPTAINER: &str = "/usr/bin/apptainer";
/// Apptainer's default `cni configuration path` ($SYSCONFDIR/apptainer/network).
pub const DEFAULT_NETWORK_DIR: &str = "/etc/apptainer/network";
pub const DEFAULT_IMAGE: &str = "${service_dir}/containers/container.sif";
pub const DEFAULT_OVERLAY: &str = "${service_dir}/overlay/overlay.img";
/// The seed's start.sh sourced this file when present; we read it instead (never a shell).
pub const DEFAULT_ENV_FILE: &str = "${service_dir}/bin/.service_env";
/// Ansible's default (`overlay_size | default(1024)`).
pub const DEFAULT_OVERLAY_MIB: u64 = 1024;
/// Apptainer refuses smaller overlays (`overlay create`: "overlay size must be >= 64 MiB").
pub const MIN_OVERLAY_MIB: u64 = 64;
pub const DEFAULT_START_SEC: u64 = 300;
/// Above systemd's own per-unit `DefaultTimeoutStopSec=90s` inside the container, so an
/// orderly halt has the time it needs before we escalate (README "Timeouts").
pub const DEFAULT_STOP_SEC: u64 = 120;
pub const DEFAULT_KILL_SEC: u64 = 15;
pub const DEFAULT_WATCHDOG_SEC: u64 = 60;

// ---------------------------------------------------------------------------------------
// The validated service

/// One service, validated: all paths absolute, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The file it came from (for messages).
    pub file: PathBuf,
    pub name: String,
    pub service_dir: PathBuf,
    pub image: PathBuf,
    pub image_url: Option<String>,
    pub boot: bool,
    pub hostname: Option<String>,
    pub binds: Vec<Bind>,
    pub env_file: EnvFile,
    pub env: BTreeMap<String, String>,
    pub networks: Vec<Network>,
    pub overlay: Overlay,
    pub apptainer: Apptainer,
    pub readiness: Readiness,
    pub timeouts: Timeouts,
    /// `[unit]`: the host-side dependencies of the generated `NAME.service`.
    pub unit: UnitDeps,
    /// `[install]`: the `.wants/` and `.requires/` links the generator writes.
    pub install: Install,
    pub security: Security,
    /// `[update]`: how `update` judges and keeps images.
    pub update: Update,
    /// Line of each key the file sets explicitly (absent: the default was used), so host
    /// checks that fail later can still point at the line.
    pub lines: BTreeMap<&'static str, usize>,
}

impl Service {
    /// `file:line: key` for messages; the line is omitted for defaults.
    pub fn locate(&self, key: &str) -> String {
        match self.lines.get(key) {
            Some(l) => format!("{}:{l}: {key}", self.file.display()),
            None => format!("{}: {key} (default)", self.file.display()),
        }
    }
}

/// One `-B src[:dst[:opts]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: Option<PathBuf>,
    pub opts: Option<BindOpt>,
    /// Line of the entry in the service file, for host checks that fail later.
    pub line: usize,
    /// Column of the entry on that line (1-based), for the same messages.
    pub column: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindOpt {
    Ro,
    Rw,
}

impl Bind {
    /// Where it appears inside the container.
    pub fn target(&self) -> &Path {
        self.dst.as_deref().unwrap_or(&self.src)
    }

    /// The spec as Apptainer's `--bind` takes it.
    pub fn spec(&self) -> String {
        let mut s = self.src.display().to_string();
        if let Some(dst) = &self.dst {
            s.push(':');
            s.push_str(&dst.display().to_string());
            if let Some(opt) = self.opts {
                s.push(':');
                s.push_str(match opt {
                    BindOpt::Ro => "ro",
                    BindOpt::Rw => "rw",
                });
            }
        }
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFile {
    pub path: PathBuf,
    /// Set in the file: then it must exist. The default may be absent, as in start.sh.
    pub explicit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    /// `--network-args` for this network, without the `name:` prefix (Apptainer adds it
    /// back per network: `"[<net>:]K=V;K2=V2"`).
    pub args: Vec<String>,
    /// The CNI conflist the supervisor writes; `None` for an external (hand-managed) one,
    /// which is only checked to exist.
    pub cni: Option<Cni>,
    /// Take over an existing conflist of that name that we did not write.
    pub manage: bool,
    /// Line of the `name` key, for messages.
    pub line: usize,
}

/// What a network's conflist says, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cni {
    pub kind: CniKind,
    /// Parent interface (macvlan, ipvlan) on the host.
    pub master: Option<String>,
    pub mode: Option<String>,
    /// Bridge device name (bridge).
    pub bridge: Option<String>,
    pub mtu: Option<u32>,
    pub mac: Option<String>,
    pub ipam: Ipam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CniKind {
    Macvlan,
    Bridge,
    Ipvlan,
}

impl CniKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CniKind::Macvlan => "macvlan",
            CniKind::Bridge => "bridge",
            CniKind::Ipvlan => "ipvlan",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipam {
    /// Fixed addresses (CIDR), an optional gateway, routes.
    Static {
        addresses: Vec<IpNet>,
        gateway: Option<std::net::IpAddr>,
        routes: Vec<Route>,
    },
    /// A range of a subnet, leases kept by the plugin in `data_dir`.
    HostLocal {
        subnet: IpNet,
        range_start: Option<std::net::IpAddr>,
        range_end: Option<std::net::IpAddr>,
        gateway: Option<std::net::IpAddr>,
        routes: Vec<Route>,
        data_dir: Option<PathBuf>,
    },
    /// Addresses from the site's DHCP server (needs the CNI dhcp daemon running).
    Dhcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<std::net::IpAddr>,
}

/// An address with its prefix length (`10.1.225.1/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} needs a prefix length (e.g. 10.1.0.5/16)"))?;
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{p:?} is not a prefix length for {a}"))?;
        Ok(IpNet { addr, prefix })
    }

    /// Whether `ip` lies in this address's subnet.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        let bits = |a: std::net::IpAddr| -> u128 {
            match a {
                V4(v) => u32::from(v) as u128,
                V6(v) => u128::from(v),
            }
        };
        match (self.addr, ip) {
            (V4(_), V4(_)) | (V6(_), V6(_)) => {
                let width = if self.addr.is_ipv4() { 32 } else { 128 };
                let shift = width - self.prefix as u32;
                shift >= width || bits(self.addr) >> shift == bits(ip) >> shift
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub path: PathBuf,
    pub size_mib: u64,
    pub sparse: bool,
    /// Accept an overlay on an NFS mount whose file locks are local to this host
    /// (`nolock`, `local_lock=all|posix`): nothing then stops a second host.
    pub allow_local_locks: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apptainer {
    pub binary: PathBuf,
    /// Apptainer's `cni configuration path`, where the conflists go.
    pub network_dir: PathBuf,
    pub extra_args: Vec<String>,
}

/// What READY=1 means, and what a required unit's failure does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub mode: ReadinessMode,
    /// Units inside that must be active before READY=1 (e.g. httpd.service).
    pub required_units: Vec<String>,
    /// `degraded` (some unit failed) counts as booted; production images are rarely spotless.
    pub accept_degraded: bool,
    pub on_failure: OnFailure,
    /// `restart-unit`: at most this many restarts of required units within the window,
    /// then the whole service is restarted (exit non-zero).
    pub max_restarts: u32,
    pub restart_window_sec: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadinessMode {
    /// The container's own systemd, over its system bus: booted and required units active.
    InnerSystemd,
    /// The instance is up (`instance start` returned and its processes live). For images
    /// without systemd or D-Bus.
    Instance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    RestartUnit,
    RestartService,
    Ignore,
}

impl ReadinessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadinessMode::InnerSystemd => "inner-systemd",
            ReadinessMode::Instance => "instance",
        }
    }
}

/// `[security]`. `keep_capabilities` kept capabilities back from a bounding-set drop the
/// supervisor no longer makes (see [`crate::host::privilege`]): still read, so that a deployed
/// file keeps parsing, and warned about. `trusted_owners` and `strict_paths` tune the
/// ownership and permission rule for the files that decide what root runs (see
/// [`crate::host`]'s path checks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// The names listed; no effect (see [`crate::host::privilege::keep_capabilities_notice`]).
    pub keep_capabilities: Vec<caps::Capability>,
    /// Uids trusted besides root to own those files and the directories above them (a
    /// root_squash NFS export shows root's files as 65534).
    pub trusted_owners: Vec<u32>,
    /// Refuse (instead of warning about) a group-writable or untrusted-owner directory above
    /// them, image or overlay.
    pub strict_paths: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub start_sec: u64,
    pub stop_sec: u64,
    pub kill_sec: u64,
    pub watchdog_sec: u64,
    /// How long `apptainer overlay create` may take; `None`: by the size (see
    /// [`Timeouts::overlay_create`]).
    pub overlay_create_sec: Option<u64>,
}

impl Timeouts {
    /// The deadline of an overlay creation of `size_mib`: `timeouts.overlay_create_sec`,
    /// else 60 s and 1 s per GiB (mkfs writes inode tables in proportion to the size; on
    /// a slow NFS a GiB a second is a floor, not a promise).
    pub fn overlay_create(&self, size_mib: u64) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.overlay_create_sec
                .unwrap_or(60 + size_mib.div_ceil(1024)),
        )
    }
}

/// `[update]`: what `apptainer-supervisor update` does after the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update {
    /// After READY on the new image, how long the unit must stay active (no restart, no
    /// failed required unit ending the run) before the update counts as good and the
    /// overlay snapshot is removed.
    pub probation_sec: u64,
    /// How many earlier images `update` keeps in `images/` besides the running one and the
    /// rollback target (which are never removed).
    pub keep: u64,
}

/// `update.probation_sec` by default: long enough for a portal's first requests or a
/// login node's first logins after the boot, short enough that an operator waits for it.
pub const DEFAULT_PROBATION_SEC: u64 = 180;
/// `update.keep` by default.
pub const DEFAULT_KEEP: u64 = 2;

impl Default for Update {
    fn default() -> Self {
        Update {
            probation_sec: DEFAULT_PROBATION_SEC,
            keep: DEFAULT_KEEP,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            start_sec: DEFAULT_START_SEC,
            stop_sec: DEFAULT_STOP_SEC,
            kill_sec: DEFAULT_KILL_SEC,
            watchdog_sec: DEFAULT_WATCHDOG_SEC,
            overlay_create_sec: None,
        }
    }
}

/// `[unit]`: what the generated `NAME.service` adds to the template's `[Unit]` section
/// (apptainer-supervisor-generator(8)). The template unit ignores it: a drop-in is the
/// template's way to add dependencies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitDeps {
    pub description: Option<String>,
    /// URIs (`man:`, `https:`, ...), as `Documentation=` takes them.
    pub documentation: Vec<String>,
    /// Host unit names, each checked as systemd.unit(5) spells them.
    pub after: Vec<String>,
    pub before: Vec<String>,
    pub wants: Vec<String>,
    pub requires: Vec<String>,
}

/// `[install]`: units that pull the generated `NAME.service` in. Generated units are never
/// `systemctl enable`d (systemd.generator(7)), so the generator writes these links itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Install {
    pub wanted_by: Vec<String>,
    pub required_by: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Errors

/// Reads and validates one service file. `expected_name` is the `NAME` the file was
/// looked up by (`run NAME`); the file's own `name`, when set, must agree with it.
pub fn load(path: &Path, expected_name: Option<&str>) -> Result<Service, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path, expected_name)
}

/// Path of `NAME.toml` in `dir`; the name is checked first so that no name can point
/// outside the directory.
pub fn path_for(dir: &Path, name: &str) -> Result<PathBuf, String> {
    check_name(name)?;
    Ok(dir.join(format!("{name}.toml")))
}

/// Parses service-file text; `path` is used for messages and for the default name.
pub fn parse(text: &str, path: &Path, expected_name: Option<&str>) -> Result<Service, ConfigError> {
    let raw: RawService = toml::from_str(text).map_err(|e| {
        let (line, column, key) = match e.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                (l, c, error_key(text, span.start, e.message()))
            }
            None => (1, 1, String::from("(file)")),
        };
        ConfigError::Invalid {
            path: path.to_owned(),
            issues: vec![Issue {
                line,
                column,
                key,
                reason: e.message().trim_end().to_owned(),
                hint: None,
                snippet: e.span().map(|s| snippet(text, s.start)).unwrap_or_default(),
            }],
        }
    })?;
    let mut v = Validator {
        text,
        issues: Vec::new(),
    };
    let service = v.service(raw, path, expected_name);
    if v.issues.is_empty() {
        Ok(service)
    } else {
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            issues: v.issues,
        })
    }
}

impl fmt::Display for BindOpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BindOpt::Ro => "ro",
            BindOpt::Rw => "rw",
        })
    }
}

// ---------------------------------------------------------------------------------------
// The env file (`.service_env`)
