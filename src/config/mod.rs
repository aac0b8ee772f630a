//! Service files: TOML in, a validated [`Service`] out.
//!
//! One file per service (`/etc/apptainer-supervisor/<name>.toml`). Parsing happens in two
//! steps: serde reads the text into `Raw*` structs (`deny_unknown_fields`, values kept as
//! [`toml::Spanned`] so a later check can still point at a line), then [`validate`] turns
//! them into a [`Service`] with every path absolute and every default filled in, collecting
//! all problems before it gives up. Nothing here touches the host: checks that need the
//! host (does the image exist?) live in [`crate::host`].

pub mod keys;

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

/// `[security]`. Its one key, `keep_capabilities`, kept capabilities back from a bounding-set
/// drop the supervisor no longer makes (see [`crate::host::privilege`]): still read, so that a
/// deployed file keeps parsing, and warned about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// The names listed; no effect (see [`crate::host::privilege::keep_capabilities_notice`]).
    pub keep_capabilities: Vec<caps::Capability>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub start_sec: u64,
    pub stop_sec: u64,
    pub kill_sec: u64,
    pub watchdog_sec: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            start_sec: DEFAULT_START_SEC,
            stop_sec: DEFAULT_STOP_SEC,
            kill_sec: DEFAULT_KILL_SEC,
            watchdog_sec: DEFAULT_WATCHDOG_SEC,
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

/// One problem in a service file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub reason: String,
    pub hint: Option<String>,
    /// The offending source line with a caret under the column.
    pub snippet: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read service file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_issues(path, issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

fn render_issues(path: &Path, issues: &[Issue]) -> String {
    let mut out = String::new();
    for (i, issue) in issues.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}:{}:{}: {}: {}",
            path.display(),
            issue.line,
            issue.column,
            issue.key,
            issue.reason
        ));
        if !issue.snippet.is_empty() {
            out.push('\n');
            out.push_str(&issue.snippet);
        }
        if let Some(hint) = &issue.hint {
            out.push_str(&format!("\n  hint: {hint}"));
        }
    }
    out
}

impl ConfigError {
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid { issues, .. } => issues,
            ConfigError::Read { .. } => &[],
        }
    }
}

// ---------------------------------------------------------------------------------------
// The file as serde sees it

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Spanned<String>>,
    service_dir: Spanned<String>,
    image: Option<Spanned<String>>,
    image_url: Option<String>,
    #[serde(default = "yes")]
    boot: bool,
    hostname: Option<Spanned<String>>,
    #[serde(default)]
    binds: Vec<Spanned<String>>,
    env_file: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    network: Vec<RawNetwork>,
    #[serde(default)]
    overlay: RawOverlay,
    #[serde(default)]
    apptainer: RawApptainer,
    #[serde(default)]
    readiness: RawReadiness,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    unit: RawUnit,
    #[serde(default)]
    install: RawInstall,
    #[serde(default)]
    security: RawSecurity,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: Spanned<String>,
    #[serde(default)]
    args: Vec<Spanned<String>>,
    #[serde(rename = "type")]
    kind: Option<Spanned<CniKind>>,
    master: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    bridge: Option<Spanned<String>>,
    mtu: Option<Spanned<u32>>,
    mac: Option<Spanned<String>>,
    #[serde(default)]
    external: bool,
    #[serde(default)]
    manage: bool,
    ipam: Option<Spanned<RawIpam>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIpam {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    gateway: Option<Spanned<String>>,
    #[serde(default)]
    routes: Vec<Spanned<String>>,
    subnet: Option<Spanned<String>>,
    range_start: Option<Spanned<String>>,
    range_end: Option<Spanned<String>>,
    data_dir: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverlay {
    path: Option<Spanned<String>>,
    size_mib: Option<Spanned<u64>>,
    sparse: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApptainer {
    binary: Option<Spanned<String>>,
    network_dir: Option<Spanned<String>>,
    #[serde(default)]
    extra_args: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    mode: Option<Spanned<ReadinessMode>>,
    #[serde(default)]
    required_units: Vec<Spanned<String>>,
    accept_degraded: Option<bool>,
    on_failure: Option<OnFailure>,
    max_restarts: Option<u32>,
    restart_window_sec: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    start_sec: Option<Spanned<u64>>,
    stop_sec: Option<Spanned<u64>>,
    kill_sec: Option<Spanned<u64>>,
    watchdog_sec: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    description: Option<Spanned<String>>,
    #[serde(default)]
    documentation: Vec<Spanned<String>>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    #[serde(default)]
    before: Vec<Spanned<String>>,
    #[serde(default)]
    wants: Vec<Spanned<String>>,
    #[serde(default)]
    requires: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstall {
    #[serde(default)]
    wanted_by: Vec<Spanned<String>>,
    #[serde(default)]
    required_by: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    #[serde(default)]
    keep_capabilities: Vec<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------
// Loading

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

struct Validator<'a> {
    text: &'a str,
    issues: Vec<Issue>,
}

impl Validator<'_> {
    fn push(&mut self, offset: usize, key: &str, reason: impl Into<String>, hint: Option<&str>) {
        let (line, column) = line_col(self.text, offset);
        self.issues.push(Issue {
            line,
            column,
            key: key.to_owned(),
            reason: reason.into(),
            hint: hint.map(str::to_owned),
            snippet: snippet(self.text, offset),
        });
    }

    fn service(&mut self, raw: RawService, path: &Path, expected: Option<&str>) -> Service {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match &raw.name {
            Some(n) => {
                if let Err(reason) = check_name(n.get_ref()) {
                    self.push(n.span().start, keys::NAME, reason, None);
                }
                if let Some(expected) = expected {
                    if n.get_ref() != expected {
                        self.push(
                            n.span().start,
                            keys::NAME,
                            format!(
                                "is {:?}, but the file was loaded as {expected:?}",
                                n.get_ref()
                            ),
                            Some("the file name (NAME.toml) and `name` must agree"),
                        );
                    }
                }
                n.get_ref().clone()
            }
            None => {
                if let Err(reason) = check_name(&stem) {
                    self.push(
                        0,
                        keys::NAME,
                        format!("not set, and the file name {reason}"),
                        None,
                    );
                }
                stem
            }
        };

        let subst = Subst {
            name: &name,
            service_dir: None,
        };
        let service_dir = self
            .abs_path(&raw.service_dir, keys::SERVICE_DIR, &subst, None)
            .unwrap_or_default();
        let subst = Subst {
            name: &name,
            service_dir: Some(&service_dir),
        };

        let image = self.opt_path(
            raw.image.as_ref(),
            DEFAULT_IMAGE,
            keys::IMAGE,
            &subst,
            &service_dir,
        );

        let hostname = raw.hostname.as_ref().map(|h| {
            if let Err(reason) = check_hostname(h.get_ref()) {
                self.push(h.span().start, keys::HOSTNAME, reason, None);
            }
            h.get_ref().clone()
        });

        let binds = self.binds(&raw.binds, &subst);

        let env_file = EnvFile {
            path: self.opt_path(
                raw.env_file.as_ref(),
                DEFAULT_ENV_FILE,
                keys::ENV_FILE,
                &subst,
                &service_dir,
            ),
            explicit: raw.env_file.is_some(),
        };

        let mut env = BTreeMap::new();
        for (k, value) in raw.env {
            if let Err(reason) = check_env_name(k.get_ref()) {
                self.push(k.span().start, keys::ENV, reason, None);
            } else if let Some(reason) = state_dir_env(k.get_ref()) {
                self.push(k.span().start, keys::ENV, reason, Some(STATE_DIR_ENV_HINT));
            }
            env.insert(k.into_inner(), value);
        }

        let networks = self.networks(&raw.network);

        let overlay = Overlay {
            path: self.opt_path(
                raw.overlay.path.as_ref(),
                DEFAULT_OVERLAY,
                keys::OVERLAY_PATH,
                &subst,
                &service_dir,
            ),
            size_mib: match &raw.overlay.size_mib {
                Some(s) => {
                    if *s.get_ref() < MIN_OVERLAY_MIB {
                        self.push(
                            s.span().start,
                            keys::OVERLAY_SIZE_MIB,
                            format!(
                                "{} MiB is below Apptainer's minimum of {MIN_OVERLAY_MIB} MiB",
                                s.get_ref()
                            ),
                            None,
                        );
                    }
                    *s.get_ref()
                }
                None => DEFAULT_OVERLAY_MIB,
            },
            sparse: raw.overlay.sparse.unwrap_or(true),
        };

        let apptainer = Apptainer {
            network_dir: match &raw.apptainer.network_dir {
                Some(d) => self
                    .abs_path(d, keys::APPTAINER_NETWORK_DIR, &subst, None)
                    .unwrap_or_default(),
                None => PathBuf::from(DEFAULT_NETWORK_DIR),
            },
            binary: match &raw.apptainer.binary {
                Some(b) => self
                    .abs_path(b, keys::APPTAINER_BINARY, &subst, None)
                    .unwrap_or_default(),
                None => PathBuf::from(DEFAULT_APPTAINER),
            },
            extra_args: raw
                .apptainer
                .extra_args
                .iter()
                .map(|a| {
                    let arg = a.get_ref();
                    if arg.is_empty() || arg.contains('\0') {
                        self.push(
                            a.span().start,
                            keys::APPTAINER_EXTRA_ARGS,
                            "empty or NUL argument",
                            None,
                        );
                    } else if arg == "--network" || arg.starts_with("--network=") {
                        // The supervisor passes --network itself (none, or the [[network]]
                        // list) and releases the leases of exactly those networks.
                        self.push(
                            a.span().start,
                            keys::APPTAINER_EXTRA_ARGS,
                            format!("{arg:?}: networks are set with [[network]], so that they are checked and their leases released"),
                            Some("for Apptainer's default bridge: [[network]] name = \"bridge\" external = true"),
                        );
                    }
                    a.get_ref().clone()
                })
                .collect(),
        };

        let timeouts = self.timeouts(&raw.timeouts);
        let security = Security {
            keep_capabilities: raw
                .security
                .keep_capabilities
                .iter()
                .filter_map(|c| match parse_cap(c.get_ref()) {
                    Ok(cap) => Some(cap),
                    Err(reason) => {
                        self.push(
                            c.span().start,
                            keys::SECURITY_KEEP_CAPABILITIES,
                            reason,
                            None,
                        );
                        None
                    }
                })
                .collect(),
        };
        let readiness = self.readiness(&raw.readiness, raw.boot);
        let unit = self.unit_deps(&raw.unit, &name);
        let install = Install {
            wanted_by: self.host_units(&raw.install.wanted_by, keys::INSTALL_WANTED_BY, &name),
            required_by: self.host_units(
                &raw.install.required_by,
                keys::INSTALL_REQUIRED_BY,
                &name,
            ),
        };

        let mut lines = BTreeMap::new();
        if let Some(c) = raw.security.keep_capabilities.first() {
            lines.insert(
                keys::SECURITY_KEEP_CAPABILITIES,
                line_col(self.text, c.span().start).0,
            );
        }
        for (key, v) in [
            (keys::IMAGE, raw.image.as_ref()),
            (keys::ENV_FILE, raw.env_file.as_ref()),
            (keys::OVERLAY_PATH, raw.overlay.path.as_ref()),
            (keys::APPTAINER_BINARY, raw.apptainer.binary.as_ref()),
            (keys::SERVICE_DIR, Some(&raw.service_dir)),
        ] {
            if let Some(v) = v {
                lines.insert(key, line_col(self.text, v.span().start).0);
            }
        }

        Service {
            file: path.to_owned(),
            name,
            service_dir,
            image,
            image_url: raw.image_url,
            boot: raw.boot,
            hostname,
            binds,
            env_file,
            env,
            networks,
            overlay,
            apptainer,
            readiness,
            timeouts,
            unit,
            install,
            security,
            lines,
        }
    }

    /// A path that must come out absolute after substitution. `base` allows a relative
    /// value, resolved against it (the service directory).
    fn abs_path(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        subst: &Subst,
        base: Option<&Path>,
    ) -> Option<PathBuf> {
        let at = value.span().start;
        let expanded = match subst.apply(value.get_ref()) {
            Ok(s) => s,
            Err(reason) => {
                self.push(at, key, reason, None);
                return None;
            }
        };
        let p = PathBuf::from(&expanded);
        let p = if p.is_absolute() {
            p
        } else if let Some(base) = base {
            base.join(p)
        } else {
            self.push(
                at,
                key,
                format!("{expanded:?} is not an absolute path"),
                None,
            );
            return None;
        };
        if let Err(reason) = check_path(&p) {
            self.push(at, key, reason, None);
            return None;
        }
        Some(p)
    }

    fn opt_path(
        &mut self,
        value: Option<&Spanned<String>>,
        default: &str,
        key: &str,
        subst: &Subst,
        service_dir: &Path,
    ) -> PathBuf {
        match value {
            Some(v) => self
                .abs_path(v, key, subst, Some(service_dir))
                .unwrap_or_default(),
            None => PathBuf::from(subst.apply(default).unwrap_or_default()),
        }
    }

    fn binds(&mut self, raw: &[Spanned<String>], subst: &Subst) -> Vec<Bind> {
        let mut out: Vec<Bind> = Vec::new();
        for spec in raw {
            let at = spec.span().start;
            let expanded = match subst.apply(spec.get_ref()) {
                Ok(s) => s,
                Err(reason) => {
                    self.push(at, keys::BINDS, reason, None);
                    continue;
                }
            };
            match parse_bind(&expanded) {
                Ok(mut bind) => {
                    (bind.line, bind.column) = line_col(self.text, at);
                    if let Some(prev) = out.iter().find(|b| b.target() == bind.target()) {
                        self.push(
                            at,
                            keys::BINDS,
                            format!(
                                "{:?} is mounted at {} already (line {})",
                                expanded,
                                prev.target().display(),
                                prev.line
                            ),
                            Some("each container path may be the target of one bind"),
                        );
                    }
                    out.push(bind);
                }
                Err((reason, hint)) => {
                    self.push(at, keys::BINDS, format!("{expanded:?}: {reason}"), hint)
                }
            }
        }
        out
    }

    fn networks(&mut self, raw: &[RawNetwork]) -> Vec<Network> {
        let mut out: Vec<Network> = Vec::new();
        for n in raw {
            let at = n.name.span().start;
            if let Err(reason) = check_network_name(n.name.get_ref()) {
                self.push(at, keys::NETWORK_NAME, reason, None);
            } else if out.iter().any(|o| &o.name == n.name.get_ref()) {
                self.push(
                    at,
                    keys::NETWORK_NAME,
                    format!("{:?} is listed twice", n.name.get_ref()),
                    None,
                );
            }
            let mut args = Vec::new();
            for a in &n.args {
                let s = a.get_ref();
                // `--network-args` is a pflag string slice read as CSV
                // (cmd/internal/cli/action_flags.go, pkg/cmdline/flag.go): a ',' would split
                // the value and hand the rest to every network, a '"' is CSV quoting. Apptainer's
                // parseArg (pkg/network/network.go) splits each pair on every '=' and wants
                // exactly two parts, so a value may not contain '=' either.
                if s.matches('=').count() != 1
                    || s.starts_with('=')
                    || s.chars()
                        .any(|c| matches!(c, ';' | ',' | '"') || c.is_control())
                {
                    self.push(
                        a.span().start,
                        keys::NETWORK_ARGS,
                        format!("{s:?} is not one KEY=VALUE (one '=', no ';', ',' or '\"')"),
                        Some("one entry per argument, e.g. args = [\"IP=10.1.225.1/16\"]"),
                    );
                }
                args.push(s.clone());
            }
            let cni = self.cni(n);
            out.push(Network {
                name: n.name.get_ref().clone(),
                args,
                cni,
                manage: n.manage,
                line: line_col(self.text, at).0,
            });
        }
        out
    }

    /// The CNI part of one `[[network]]`. An external network may set nothing but `name`,
    /// `args` and `external`; an owned one needs `type` and, for macvlan/ipvlan, `master`.
    fn cni(&mut self, n: &RawNetwork) -> Option<Cni> {
        let at = n.name.span().start;
        if n.external {
            let set: Vec<&str> = [
                (n.kind.is_some(), keys::NETWORK_TYPE),
                (n.master.is_some(), keys::NETWORK_MASTER),
                (n.mode.is_some(), keys::NETWORK_MODE),
                (n.bridge.is_some(), keys::NETWORK_BRIDGE),
                (n.mtu.is_some(), keys::NETWORK_MTU),
                (n.mac.is_some(), keys::NETWORK_MAC),
                (n.ipam.is_some(), keys::NETWORK_IPAM_TYPE),
                (n.manage, keys::NETWORK_MANAGE),
            ]
            .into_iter()
            .filter_map(|(set, k)| set.then_some(k))
            .collect();
            if !set.is_empty() {
                self.push(
                    at,
                    keys::NETWORK_EXTERNAL,
                    format!(
                        "an external network's conflist is hand-managed; {} cannot be set here",
                        set.join(", ")
                    ),
                    None,
                );
            }
            return None;
        }
        let Some(kind) = &n.kind else {
            let hint = (n.name.get_ref() == APPTAINER_BRIDGE).then_some(
                "Apptainer's own default network (its 00_bridge.conflist) is external: set external = true",
            );
            self.push(
                at,
                keys::NETWORK_TYPE,
                "missing: \"macvlan\", \"bridge\" or \"ipvlan\" (or external = true for a hand-managed conflist)",
                hint,
            );
            return None;
        };
        let kind_v = *kind.get_ref();
        let master = n.master.as_ref().map(|m| {
            if let Err(r) = check_ifname(m.get_ref()) {
                self.push(m.span().start, keys::NETWORK_MASTER, r, None);
            }
            m.get_ref().clone()
        });
        if master.is_none() && kind_v != CniKind::Bridge {
            self.push(
                kind.span().start,
                keys::NETWORK_MASTER,
                format!(
                    "a {} network needs its parent interface (master = \"eth0\")",
                    kind_v.as_str()
                ),
                None,
            );
        }
        if master.is_some() && kind_v == CniKind::Bridge {
            if let Some(m) = &n.master {
                self.push(
                    m.span().start,
                    keys::NETWORK_MASTER,
                    "a bridge network has no master; set bridge = \"NAME\"",
                    None,
                );
            }
        }
        let mode = n.mode.as_ref().map(|m| {
            let ok: &[&str] = match kind_v {
                CniKind::Macvlan => &["bridge", "private", "vepa", "passthru"],
                CniKind::Ipvlan => &["l2", "l3", "l3s"],
                CniKind::Bridge => &[],
            };
            if !ok.contains(&m.get_ref().as_str()) {
                let what = if ok.is_empty() {
                    "none".to_owned()
                } else {
                    ok.join(", ")
                };
                self.push(
                    m.span().start,
                    keys::NETWORK_MODE,
                    format!(
                        "{:?} is not a {} mode ({what})",
                        m.get_ref(),
                        kind_v.as_str()
                    ),
                    None,
                );
            }
            m.get_ref().clone()
        });
        let bridge = n.bridge.as_ref().map(|b| {
            if kind_v != CniKind::Bridge {
                self.push(
                    b.span().start,
                    keys::NETWORK_BRIDGE,
                    "only a bridge network has a bridge",
                    None,
                );
            } else if let Err(r) = check_ifname(b.get_ref()) {
                self.push(b.span().start, keys::NETWORK_BRIDGE, r, None);
            }
            b.get_ref().clone()
        });
        let mtu = n.mtu.as_ref().map(|m| {
            if !(68..=65535).contains(m.get_ref()) {
                self.push(
                    m.span().start,
                    keys::NETWORK_MTU,
                    "must be between 68 and 65535",
                    None,
                );
            }
            *m.get_ref()
        });
        let mac = n.mac.as_ref().map(|m| {
            if kind_v != CniKind::Macvlan {
                self.push(
                    m.span().start,
                    keys::NETWORK_MAC,
                    format!("the {} plugin takes no mac", kind_v.as_str()),
                    None,
                );
            }
            let ok = m.get_ref().split(':').count() == 6
                && m.get_ref()
                    .split(':')
                    .all(|h| h.len() == 2 && h.chars().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                self.push(
                    m.span().start,
                    keys::NETWORK_MAC,
                    format!("{:?} is not a MAC address", m.get_ref()),
                    None,
                );
            }
            m.get_ref().clone()
        });
        let ipam = match &n.ipam {
            Some(i) => self.ipam(i.get_ref(), i.span().start),
            None => {
                self.push(
                    at,
                    keys::NETWORK_IPAM_TYPE,
                    "missing: the [network.ipam] table (static, host-local or dhcp)",
                    None,
                );
                None
            }
        }?;
        Some(Cni {
            kind: kind_v,
            master,
            mode,
            bridge,
            mtu,
            mac,
            ipam,
        })
    }

    fn ip(&mut self, v: &Spanned<String>, key: &str) -> Option<std::net::IpAddr> {
        match v.get_ref().parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.push(
                    v.span().start,
                    key,
                    format!("{:?} is not an IP address", v.get_ref()),
                    None,
                );
                None
            }
        }
    }

    fn routes(&mut self, raw: &[Spanned<String>]) -> Vec<Route> {
        let mut out = Vec::new();
        for r in raw {
            let text = r.get_ref();
            let (dst, gw) = match text.split_once(" via ") {
                Some((d, g)) => (d.trim(), Some(g.trim())),
                None => (text.trim(), None),
            };
            let dst = match IpNet::parse(dst) {
                Ok(d) => d,
                Err(e) => {
                    self.push(
                        r.span().start,
                        keys::NETWORK_IPAM_ROUTES,
                        format!("{e} (routes are \"DST/LEN\" or \"DST/LEN via GW\")"),
                        None,
                    );
                    continue;
                }
            };
            let gw = match gw.map(str::parse::<std::net::IpAddr>) {
                None => None,
                Some(Ok(g)) => Some(g),
                Some(Err(_)) => {
                    self.push(
                        r.span().start,
                        keys::NETWORK_IPAM_ROUTES,
                        format!("{text:?}: the gateway is not an IP address"),
                        None,
                    );
                    continue;
                }
            };
            out.push(Route { dst, gw });
        }
        out
    }

    fn ipam(&mut self, raw: &RawIpam, at: usize) -> Option<Ipam> {
        // host-local checks its gateway against the subnet itself (one message, not two).
        let gateway = match raw.kind.get_ref().as_str() {
            "host-local" => None,
            _ => raw
                .gateway
                .as_ref()
                .and_then(|g| self.ip(g, keys::NETWORK_IPAM_GATEWAY)),
        };
        let routes = self.routes(&raw.routes);
        let only = |this: &mut Self, set: bool, key: &str, kind: &str| {
            if set {
                this.push(
                    at,
                    key,
                    format!("does not apply to ipam type {kind:?}"),
                    None,
                );
            }
        };
        match raw.kind.get_ref().as_str() {
            "static" => {
                only(
                    self,
                    raw.subnet.is_some(),
                    keys::NETWORK_IPAM_SUBNET,
                    "static",
                );
                only(
                    self,
                    raw.range_start.is_some(),
                    keys::NETWORK_IPAM_RANGE_START,
                    "static",
                );
                only(
                    self,
                    raw.range_end.is_some(),
                    keys::NETWORK_IPAM_RANGE_END,
                    "static",
                );
                only(
                    self,
                    raw.data_dir.is_some(),
                    keys::NETWORK_IPAM_DATA_DIR,
                    "static",
                );
                if raw.addresses.is_empty() {
                    self.push(
                        at,
                        keys::NETWORK_IPAM_ADDRESSES,
                        "a static network needs at least one address (\"10.1.225.1/16\")",
                        None,
                    );
                }
                let mut addresses = Vec::new();
                for a in &raw.addresses {
                    match IpNet::parse(a.get_ref()) {
                        Ok(net) => addresses.push(net),
                        Err(e) => self.push(a.span().start, keys::NETWORK_IPAM_ADDRESSES, e, None),
                    }
                }
                if let (Some(gw), Some(g)) = (gateway, &raw.gateway) {
                    if !addresses
                        .iter()
                        .filter(|a| a.addr.is_ipv4() == gw.is_ipv4())
                        .any(|a| a.contains(gw))
                    {
                        self.push(
                            g.span().start,
                            keys::NETWORK_IPAM_GATEWAY,
                            format!("{gw} is outside the subnet of every address"),
                            None,
                        );
                    }
                }
                Some(Ipam::Static {
                    addresses,
                    gateway,
                    routes,
                })
            }
            "host-local" => {
                only(
                    self,
                    !raw.addresses.is_empty(),
                    keys::NETWORK_IPAM_ADDRESSES,
                    "host-local",
                );
                let Some(s) = &raw.subnet else {
                    self.push(
                        at,
                        keys::NETWORK_IPAM_SUBNET,
                        "a host-local network needs subnet = \"10.22.0.0/16\"",
                        None,
                    );
                    return None;
                };
                let subnet = match IpNet::parse(s.get_ref()) {
                    Ok(n) => n,
                    Err(e) => {
                        self.push(s.span().start, keys::NETWORK_IPAM_SUBNET, e, None);
                        return None;
                    }
                };
                let inside = |this: &mut Self, v: &Option<Spanned<String>>, key: &str| {
                    let ip = v.as_ref().and_then(|x| this.ip(x, key))?;
                    if !subnet.contains(ip) {
                        let at = v.as_ref().map_or(at, |x| x.span().start);
                        this.push(at, key, format!("{ip} is outside subnet {subnet}"), None);
                    }
                    Some(ip)
                };
                let range_start = inside(self, &raw.range_start, keys::NETWORK_IPAM_RANGE_START);
                let range_end = inside(self, &raw.range_end, keys::NETWORK_IPAM_RANGE_END);
                let gateway = inside(self, &raw.gateway, keys::NETWORK_IPAM_GATEWAY).or(gateway);
                if let (Some(a), Some(b), Some(e)) = (range_start, range_end, &raw.range_end) {
                    if a > b {
                        self.push(
                            e.span().start,
                            keys::NETWORK_IPAM_RANGE_END,
                            format!("{b} comes before range_start {a}"),
                            None,
                        );
                    }
                }
                let data_dir = raw.data_dir.as_ref().map(|d| {
                    let p = PathBuf::from(d.get_ref());
                    if !p.is_absolute() {
                        self.push(
                            d.span().start,
                            keys::NETWORK_IPAM_DATA_DIR,
                            "must be an absolute path",
                            None,
                        );
                    }
                    p
                });
                Some(Ipam::HostLocal {
                    subnet,
                    range_start,
                    range_end,
                    gateway,
                    routes,
                    data_dir,
                })
            }
            "dhcp" => {
                only(
                    self,
                    !raw.addresses.is_empty(),
                    keys::NETWORK_IPAM_ADDRESSES,
                    "dhcp",
                );
                only(
                    self,
                    raw.subnet.is_some(),
                    keys::NETWORK_IPAM_SUBNET,
                    "dhcp",
                );
                only(
                    self,
                    raw.gateway.is_some(),
                    keys::NETWORK_IPAM_GATEWAY,
                    "dhcp",
                );
                // The DHCP server decides these: accepting them silently would mislead.
                only(
                    self,
                    !raw.routes.is_empty(),
                    keys::NETWORK_IPAM_ROUTES,
                    "dhcp",
                );
                only(
                    self,
                    raw.range_start.is_some(),
                    keys::NETWORK_IPAM_RANGE_START,
                    "dhcp",
                );
                only(
                    self,
                    raw.range_end.is_some(),
                    keys::NETWORK_IPAM_RANGE_END,
                    "dhcp",
                );
                only(
                    self,
                    raw.data_dir.is_some(),
                    keys::NETWORK_IPAM_DATA_DIR,
                    "dhcp",
                );
                Some(Ipam::Dhcp)
            }
            other => {
                self.push(
                    raw.kind.span().start,
                    keys::NETWORK_IPAM_TYPE,
                    format!("{other:?} is not \"static\", \"host-local\" or \"dhcp\""),
                    None,
                );
                None
            }
        }
    }

    fn readiness(&mut self, raw: &RawReadiness, boot: bool) -> Readiness {
        // Without --boot there is no systemd inside to ask.
        let default_mode = if boot {
            ReadinessMode::InnerSystemd
        } else {
            ReadinessMode::Instance
        };
        let mode = raw.mode.as_ref().map_or(default_mode, |m| *m.get_ref());
        let mode_at = raw.mode.as_ref().map_or(0, |m| m.span().start);
        let mut units: Vec<String> = Vec::new();
        for u in &raw.required_units {
            let name = u.get_ref();
            if let Err(reason) = check_unit_name(name) {
                self.push(u.span().start, keys::READINESS_REQUIRED_UNITS, reason, None);
            } else if units.contains(name) {
                self.push(
                    u.span().start,
                    keys::READINESS_REQUIRED_UNITS,
                    format!("{name:?} is listed twice"),
                    None,
                );
            }
            units.push(name.clone());
        }
        if mode == ReadinessMode::InnerSystemd && !boot {
            self.push(
                mode_at,
                keys::READINESS_MODE,
                "\"inner-systemd\" needs boot = true: without --boot there is no systemd inside",
                Some("set readiness.mode = \"instance\", or boot = true"),
            );
        }
        if mode == ReadinessMode::Instance && !units.is_empty() {
            if let Some(u) = raw.required_units.first() {
                self.push(
                    u.span().start,
                    keys::READINESS_REQUIRED_UNITS,
                    "required units need readiness.mode = \"inner-systemd\"",
                    Some("without the inner systemd nobody can tell whether a unit is active"),
                );
            }
        }
        let window = match &raw.restart_window_sec {
            Some(w) if *w.get_ref() == 0 => {
                self.push(
                    w.span().start,
                    keys::READINESS_RESTART_WINDOW_SEC,
                    "must be at least 1",
                    None,
                );
                300
            }
            Some(w) => *w.get_ref(),
            None => 300,
        };
        Readiness {
            mode,
            required_units: units,
            accept_degraded: raw.accept_degraded.unwrap_or(true),
            on_failure: raw.on_failure.unwrap_or(OnFailure::RestartUnit),
            max_restarts: raw.max_restarts.unwrap_or(3),
            restart_window_sec: window,
        }
    }

    /// `[unit]`: free text and URIs checked for what a unit file line can carry, unit
    /// names as systemd.unit(5) spells them.
    fn unit_deps(&mut self, raw: &RawUnit, name: &str) -> UnitDeps {
        let description = raw.description.as_ref().map(|d| {
            let text = d.get_ref();
            if text.trim().is_empty() {
                self.push(d.span().start, keys::UNIT_DESCRIPTION, "is empty", None);
            } else if text.chars().any(char::is_control) {
                self.push(
                    d.span().start,
                    keys::UNIT_DESCRIPTION,
                    "contains a newline or another control character; a unit file line cannot",
                    None,
                );
            }
            text.clone()
        });
        let mut documentation = Vec::new();
        for d in &raw.documentation {
            if let Err(reason) = check_doc_uri(d.get_ref()) {
                self.push(
                    d.span().start,
                    keys::UNIT_DOCUMENTATION,
                    reason,
                    Some("systemd takes http:, https:, file:, info: and man: URIs (systemd.unit(5) Documentation=)"),
                );
            }
            documentation.push(d.get_ref().clone());
        }
        UnitDeps {
            description,
            documentation,
            after: self.host_units(&raw.after, keys::UNIT_AFTER, name),
            before: self.host_units(&raw.before, keys::UNIT_BEFORE, name),
            wants: self.host_units(&raw.wants, keys::UNIT_WANTS, name),
            requires: self.host_units(&raw.requires, keys::UNIT_REQUIRES, name),
        }
    }

    /// A list of host unit names: each a loadable name (no template), none twice, and not
    /// the generated unit itself.
    fn host_units(&mut self, raw: &[Spanned<String>], key: &str, name: &str) -> Vec<String> {
        let own = format!("{name}.service");
        let mut out: Vec<String> = Vec::new();
        for u in raw {
            let unit = u.get_ref();
            if let Err(reason) = check_host_unit_name(unit) {
                self.push(u.span().start, key, reason, None);
            } else if *unit == own {
                self.push(
                    u.span().start,
                    key,
                    format!("{unit:?} is the generated unit itself"),
                    None,
                );
            } else if out.contains(unit) {
                self.push(
                    u.span().start,
                    key,
                    format!("{unit:?} is listed twice"),
                    None,
                );
            }
            out.push(unit.clone());
        }
        out
    }

    fn timeouts(&mut self, raw: &RawTimeouts) -> Timeouts {
        let d = Timeouts::default();
        let mut get = |v: &Option<Spanned<u64>>, key: &str, default: u64, min: u64| match v {
            Some(s) if *s.get_ref() < min => {
                self.push(s.span().start, key, format!("must be at least {min}"), None);
                default
            }
            Some(s) => *s.get_ref(),
            None => default,
        };
        Timeouts {
            start_sec: get(&raw.start_sec, keys::TIMEOUTS_START_SEC, d.start_sec, 1),
            stop_sec: get(&raw.stop_sec, keys::TIMEOUTS_STOP_SEC, d.stop_sec, 1),
            kill_sec: get(&raw.kill_sec, keys::TIMEOUTS_KILL_SEC, d.kill_sec, 1),
            // 0 turns the watchdog off in generated units.
            watchdog_sec: get(
                &raw.watchdog_sec,
                keys::TIMEOUTS_WATCHDOG_SEC,
                d.watchdog_sec,
                0,
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small pure checks

/// `${service_dir}` and `${name}` — the places where start.sh used `$DIRNAME` and the
/// service name. Nothing else is expanded, and no shell ever sees the value.
struct Subst<'a> {
    name: &'a str,
    service_dir: Option<&'a Path>,
}

impl Subst<'_> {
    fn apply(&self, s: &str) -> Result<String, String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else {
                return Err(format!("{s:?}: unclosed \"${{\""));
            };
            match &after[..end] {
                "name" => out.push_str(self.name),
                "service_dir" => match self.service_dir {
                    Some(d) => out.push_str(&d.display().to_string()),
                    None => {
                        return Err("${service_dir} cannot be used in service_dir itself".into())
                    }
                },
                other => {
                    return Err(format!(
                    "unknown substitution ${{{other}}}: only ${{service_dir}} and ${{name}} exist"
                ))
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Longest service or network name. A booted instance's host name defaults to its instance
/// name (`--boot` implies `--uts`, and Apptainer sets the hostname to the instance name),
/// and sethostname(2) refuses more than HOST_NAME_MAX = 64 bytes; every file named after a
/// service (`NAME.lock`, `NAME.run`, Apptainer's `NAME.json`) and the unit
/// `apptainer-supervisor@NAME.service` stay far below NAME_MAX (255) with it.
pub const MAX_NAME_LEN: usize = 64;

/// The one rule for every name that becomes part of a path, a file name or a command-line
/// value: service names (instance name, `/run/apptainer-supervisor/NAME.lock`, unit
/// instance) and network names (`NAME.conflist`). Apptainer's instance-name rule
/// (`^[a-zA-Z0-9._-]+$`, internal/pkg/instance) narrowed so that no name is a path of its own
/// (`.`, `..`, a hidden file) or looks like an option: the name is a positional argument
/// after the image in `apptainer instance start IMAGE NAME`, where a leading `-` would be
/// read as a flag.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; names allow only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "{name:?} starts with {:?}; a name must start with a letter, a digit or '_'",
            &name[..1]
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{name:?} is {} characters long; the limit is {MAX_NAME_LEN} (the host name a booted instance gets)",
            name.len()
        ));
    }
    Ok(())
}

/// A full systemd unit name with its type suffix (systemd.unit(5)); no instance guessing.
fn check_unit_name(u: &str) -> Result<(), String> {
    const TYPES: &[&str] = &[
        ".service",
        ".socket",
        ".target",
        ".mount",
        ".automount",
        ".swap",
        ".path",
        ".timer",
        ".slice",
        ".scope",
        ".device",
    ];
    if !TYPES.iter().any(|t| u.len() > t.len() && u.ends_with(t)) {
        return Err(format!(
            "{u:?} is not a unit name with its type (e.g. \"httpd.service\")"
        ));
    }
    if u.len() > 255
        || u.chars()
            .any(|c| !(c.is_ascii_alphanumeric() || ":-_.\\@".contains(c)))
    {
        return Err(format!(
            "{u:?} contains characters systemd does not allow in unit names"
        ));
    }
    Ok(())
}

/// A unit name on the host, for `[unit]` and `[install]`: systemd.unit(5)'s syntax
/// (`unit_name_is_valid()` in systemd's src/basic/unit-name.c: a prefix, at most one `@`
/// with a non-empty instance, a type suffix), and no template, which no dependency can
/// name.
fn check_host_unit_name(u: &str) -> Result<(), String> {
    check_unit_name(u)?;
    let stem = &u[..u.rfind('.').unwrap_or(u.len())];
    match stem.split_once('@') {
        _ if stem.is_empty() || stem.starts_with('@') => {
            Err(format!("{u:?} has no name before its type or '@'"))
        }
        Some((_, instance)) if instance.contains('@') => {
            Err(format!("{u:?} contains more than one '@'"))
        }
        Some((prefix, "")) => Err(format!(
            "{u:?} is a template; name an instance ({prefix}@NAME{})",
            &u[stem.len()..]
        )),
        _ => Ok(()),
    }
}

/// A `Documentation=` URI: one of the schemes systemd.unit(5) lists, nothing that would
/// split the space-separated list, and no `%` (systemd would read a specifier).
fn check_doc_uri(d: &str) -> Result<(), String> {
    const SCHEMES: &[&str] = &["http://", "https://", "file:", "info:", "man:"];
    if !SCHEMES
        .iter()
        .any(|s| d.len() > s.len() && d.starts_with(s))
    {
        return Err(format!(
            "{d:?} is not an http:, https:, file:, info: or man: URI"
        ));
    }
    if d.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '%' || c == '"' || c == '\\')
    {
        return Err(format!(
            "{d:?} contains a space, a quote, a backslash, '%' or a control character"
        ));
    }
    Ok(())
}

fn check_hostname(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 64 {
        return Err(format!("{h:?} must be 1 to 64 characters"));
    }
    if h.chars()
        .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(format!(
            "{h:?} may contain only letters, digits, '-' and '.'"
        ));
    }
    Ok(())
}

/// CNI network names: what `--network` selects by the conflist's `"name"`, and the file
/// name `NAME.conflist`. Same rule as service names ([`check_name`]): no ',' (it would split
/// the `--network a,b` list), nothing that is a path of its own.
///
/// `none` is Apptainer's "no CNI network" (container_linux.go `prepareNetworkSetup`), never a
/// conflist: the supervisor passes it itself for a service without networks.
fn check_network_name(n: &str) -> Result<(), String> {
    if n == NO_NETWORK {
        return Err(format!(
            "{n:?} is Apptainer's \"no network\", not a CNI network; a service without [[network]] already gets it"
        ));
    }
    check_name(n)
}

/// Apptainer's own default network: the `bridge` conflist it ships
/// (etc/network/00_bridge.conflist, v1.3.6 and v1.4.5), used by `--boot` when no `--network`
/// is given. A service asks for it with `[[network]] name = "bridge"`, `external = true`.
pub const APPTAINER_BRIDGE: &str = "bridge";

/// Variables that decide where Apptainer keeps an instance's state file and logs
/// (pkg/syfs/syfs.go `ConfigDir`: `APPTAINER_CONFIGDIR`, then `SINGULARITY_CONFIGDIR`, then
/// `$HOME/.apptainer`). Set in the env file or `[env]`, they would reach the CLI only, so
/// the instance would be recorded where neither the supervisor nor an operator's `apptainer
/// instance list` looks: refused.
pub const STATE_DIR_ENV: &[&str] = &["HOME", "APPTAINER_CONFIGDIR", "SINGULARITY_CONFIGDIR"];

/// Why `k` may not be set for the Apptainer CLI, if it may not.
pub fn state_dir_env(k: &str) -> Option<String> {
    STATE_DIR_ENV.contains(&k).then(|| {
        format!(
            "{k} would move Apptainer's instance state and logs away from where `apptainer instance list` and the supervisor look for them (pkg/syfs ConfigDir)"
        )
    })
}

/// The hint that goes with [`state_dir_env`].
pub const STATE_DIR_ENV_HINT: &str = "remove it: with boot = true the container's init gets HOME=/root anyway; to move Apptainer's state, set it in the unit's environment (systemctl edit), for the supervisor and Apptainer alike";

/// A network interface name (IFNAMSIZ 16 with the NUL; no '/' or spaces).
fn check_ifname(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 15 || n == "." || n == ".." {
        return Err(format!(
            "{n:?} is not an interface name (1 to 15 characters)"
        ));
    }
    if n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!("{n:?} is not an interface name"));
    }
    Ok(())
}

fn check_env_name(k: &str) -> Result<(), String> {
    let mut chars = k.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return Err(format!("{k:?} is not a valid environment variable name")),
    }
    if chars.any(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
        return Err(format!("{k:?} is not a valid environment variable name"));
    }
    Ok(())
}

/// No `..`, no NUL, no ':' or ',' (Apptainer's `--bind`/`--overlay` lists split on them).
fn check_path(p: &Path) -> Result<(), String> {
    let s = p.to_string_lossy();
    if s.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{s:?} contains \"..\""));
    }
    if s.contains(':') || s.contains(',') {
        return Err(format!(
            "{s:?} contains ':' or ',', which Apptainer's option lists split on"
        ));
    }
    // `--overlay` is a pflag string slice (pkg/cmdline/flag.go registers a `[]string`
    // default as StringSlice), whose values pflag reads as one CSV record: a '"' is a
    // quote (a bare one is a parse error) and a line break ends the record.
    if let Some(c) = s.chars().find(|c| *c == '"' || c.is_control()) {
        return Err(format!(
            "{s:?} contains {c:?}, which Apptainer's option parser reads as CSV syntax"
        ));
    }
    Ok(())
}

/// `src[:dst[:opts]]` as `apptainer --bind` documents it.
fn parse_bind(spec: &str) -> Result<Bind, (String, Option<&'static str>)> {
    let mut parts = spec.split(':');
    let src = PathBuf::from(parts.next().unwrap_or_default());
    let dst = parts.next().map(PathBuf::from);
    let opts = parts.next();
    if parts.next().is_some() {
        return Err(("has more than three ':'-separated fields".into(), None));
    }
    if !src.is_absolute() {
        return Err((
            "the source is not an absolute path".into(),
            Some("bind sources are host paths; write them in full, or use ${service_dir}/…"),
        ));
    }
    if let Some(dst) = &dst {
        if !dst.is_absolute() {
            return Err(("the destination is not an absolute path".into(), None));
        }
    }
    // A bind onto the container's root would hide the image and the overlay that
    // `--overlay` puts there: the one mount target Apptainer itself always owns.
    let target = dst.as_ref().unwrap_or(&src);
    if target
        .components()
        .all(|c| c == Component::RootDir || c == Component::CurDir)
    {
        return Err((
            "the target is the container's root, where the image and overlay are".into(),
            None,
        ));
    }
    for p in std::iter::once(&src).chain(dst.iter()) {
        let s = p.to_string_lossy();
        if s.contains(',') || s.contains('\0') {
            return Err((
                "contains ',' or NUL, which Apptainer's --bind splits on".into(),
                None,
            ));
        }
        // Apptainer's ParseBindPath (pkg/runtime/engine/apptainer/config/bind.go) cuts the value into pieces
        // with the regexp `([^,^:]+:?)` (a '^' falls between pieces and is lost), trims
        // each piece with strings.TrimSpace, and reads a '\' before ',' or ':' as an
        // escape: such a path would not arrive as written.
        if let Some(c) = s.chars().find(|c| matches!(c, '^' | '\\')) {
            return Err((
                format!("contains {c:?}, which Apptainer's bind parser does not keep"),
                None,
            ));
        }
        if s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) {
            return Err((
                "a path starts or ends with white space, which Apptainer's bind parser trims"
                    .into(),
                None,
            ));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(("contains \"..\"".into(), None));
        }
    }
    let opts = match opts {
        None => None,
        Some("ro") => Some(BindOpt::Ro),
        Some("rw") => Some(BindOpt::Rw),
        Some(other) => {
            return Err((
                format!("unknown bind option {other:?}"),
                Some("options are \"ro\" or \"rw\"; pass others through apptainer.extra_args"),
            ))
        }
    };
    Ok(Bind {
        src,
        dst,
        opts,
        line: 0,
        column: 0,
    })
}

/// The key a toml error is about. For "missing field `x`" the span is the enclosing
/// table (or the whole file), so the key is that table's plus the field.
fn error_key(text: &str, offset: usize, message: &str) -> String {
    let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
    else {
        return key_at(text, offset);
    };
    let line = text[offset.min(text.len())..]
        .lines()
        .next()
        .unwrap_or("")
        .trim_start();
    if line.starts_with('[') {
        format!("{}.{field}", key_at(text, offset))
    } else {
        field.to_owned()
    }
}

/// `   | line` and `   |   ^` under the column, like toml's own errors.
fn snippet(text: &str, offset: usize) -> String {
    let (line, col) = line_col(text, offset);
    let Some(src) = text.lines().nth(line - 1) else {
        return String::new();
    };
    format!("{line:>4} | {src}\n     | {}^", " ".repeat(col - 1))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted key at a byte offset: the `key =` on that line, inside the nearest
/// `[table]` or `[[table]]` header above it. Used to name the key in toml's own errors,
/// which carry a span but not always the key.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = if line.starts_with('[') {
        return line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_owned();
    } else {
        line.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"')
            .to_owned()
    };
    match (table, key.is_empty()) {
        (_, true) => "(file)".into(),
        (Some(t), false) => format!("{t}.{key}"),
        (None, false) => key,
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

/// Parses `KEY=VALUE` lines as start.sh's `source` would have set them, without a shell:
/// `#` comments and blank lines are skipped, an `export ` prefix is allowed, a value in
/// matching single or double quotes loses them. Nothing is expanded. Errors name the line.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    Ok(parse_env_file_lines(text)?
        .into_iter()
        .map(|(_, k, v)| (k, v))
        .collect())
}

/// One variable of the env file: its line, name and value.
pub type EnvLine = (usize, String, String);

/// [`parse_env_file`], with the line of each variable, for messages about one of them.
pub fn parse_env_file_lines(text: &str) -> Result<Vec<EnvLine>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((k, v)) = line.split_once('=') else {
            return Err((lineno, format!("{line:?} is not KEY=VALUE")));
        };
        check_env_name(k).map_err(|e| (lineno, e))?;
        let v = unquote(v).ok_or_else(|| (lineno, format!("unbalanced quotes in {v:?}")))?;
        if v.contains("$(") || v.contains('`') {
            return Err((
                lineno,
                format!("{k}: command substitution is not supported (the file is read, not run by a shell)"),
            ));
        }
        out.push((lineno, k.to_owned(), v));
    }
    Ok(out)
}

fn unquote(v: &str) -> Option<String> {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(q) {
            return rest.strip_suffix(q).map(str::to_owned);
        }
    }
    if v.ends_with('"') || v.ends_with('\'') {
        return None;
    }
    Some(v.to_owned())
}

/// Parses a capability name as `security.keep_capabilities` takes it: `CAP_SYS_TIME`,
/// case-insensitive, the `CAP_` prefix optional.
pub fn parse_cap(name: &str) -> Result<caps::Capability, String> {
    let canonical = caps::to_canonical(name);
    canonical
        .parse::<caps::Capability>()
        .map_err(|_| format!("{name:?} is not a Linux capability name (capabilities(7))"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OOD: &str = r#"
name = "ood001"
service_dir = "/shared/services/ood/ood001"
binds = ["/shared", "${service_dir}/root:/root"]
[[network]]
name = "macvlan_ood001"
external = true
"#;

    fn p(text: &str) -> Result<Service, ConfigError> {
        parse(
            text,
            Path::new("/etc/apptainer-supervisor/ood001.toml"),
            None,
        )
    }

    fn one_error(text: &str) -> String {
        let e = p(text).expect_err("must fail");
        assert_eq!(e.issues().len(), 1, "{e}");
        e.to_string()
    }

    #[test]
    fn defaults_fill_the_service_directory_layout() {
        let s = p(OOD).unwrap();
        assert_eq!(
            s.image,
            Path::new("/shared/services/ood/ood001/containers/container.sif")
        );
        assert_eq!(
            s.overlay.path,
            Path::new("/shared/services/ood/ood001/overlay/overlay.img")
        );
        assert_eq!(s.overlay.size_mib, 1024);
        assert!(s.overlay.sparse);
        assert!(s.boot);
        assert_eq!(
            s.env_file.path,
            Path::new("/shared/services/ood/ood001/bin/.service_env")
        );
        assert!(!s.env_file.explicit);
        assert_eq!(s.binds[1].spec(), "/shared/services/ood/ood001/root:/root");
        assert_eq!(s.timeouts, Timeouts::default());
    }

    #[test]
    fn name_defaults_to_file_stem() {
        let s = p("service_dir = \"/srv/x\"").unwrap();
        assert_eq!(s.name, "ood001");
    }

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let e = one_error("service_dir = \"/x\"\n[overlay]\nsize = 3\n");
        assert!(
            e.starts_with(
                "/etc/apptainer-supervisor/ood001.toml:3:1: overlay.size: unknown field `size`"
            ),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = one_error("service_dir = \"/x\"\n[overlay]\nsize_mib = \"big\"\n");
        assert!(
            e.starts_with(
                "/etc/apptainer-supervisor/ood001.toml:3:12: overlay.size_mib: invalid type"
            ),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let e = one_error("service_dir = \"/x\n");
        assert!(
            e.starts_with("/etc/apptainer-supervisor/ood001.toml:1:"),
            "{e}"
        );
    }

    #[test]
    fn relative_bind_source_is_refused_with_hint() {
        let e = one_error("service_dir = \"/x\"\nbinds = [\"shared:/shared\"]\n");
        assert_eq!(
            e,
            "/etc/apptainer-supervisor/ood001.toml:2:10: binds: \"shared:/shared\": the source is not an absolute path\n   2 | binds = [\"shared:/shared\"]\n     |          ^\n  hint: bind sources are host paths; write them in full, or use ${service_dir}/…"
        );
    }

    #[test]
    fn duplicate_bind_target_is_refused() {
        let e = one_error("service_dir = \"/x\"\nbinds = [\"/a:/data\", \"/b:/data\"]\n");
        assert!(
            e.contains("2:22: binds: \"/b:/data\" is mounted at /data already (line 2)"),
            "{e}"
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "../x",
            "a b",
            "..",
            ".",
            "x/y",
            "",
            ".hidden",
            "-x",
            "--help",
            "caf\u{e9}",
            "a\nb",
            &long,
        ] {
            let e = one_error(&format!("name = {bad:?}\nservice_dir = \"/x\"\n"));
            assert!(e.contains(":1:8: name: "), "{bad}: {e}");
        }
        for good in ["ood001", "_x", "0", "a.b-c_d", &long[1..]] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn network_names_follow_the_name_rule() {
        let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \".n\"\nexternal = true\n");
        assert!(
            e.contains("3:8: network.name: \".n\" starts with \".\""),
            "{e}"
        );
    }

    #[test]
    fn csv_syntax_is_refused_where_apptainer_reads_csv() {
        let e = one_error("service_dir = \"/x\"\n[overlay]\npath = \"/o/a\\\"b.img\"\n");
        assert!(
            e.contains("overlay.path: \"/o/a\\\"b.img\" contains '\"'"),
            "{e}"
        );
        let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \"n\"\nexternal = true\nargs = [\"IP=10.0.0.2/24,FOO=1\"]\n");
        assert!(
            e.contains("network.args: \"IP=10.0.0.2/24,FOO=1\" is not one KEY=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn bind_paths_apptainer_would_not_keep_are_refused() {
        for (spec, why) in [
            ("/a^b:/c", "contains '^'"),
            ("/a\\\\b:/c", "contains '\\\\'"),
            ("/a:/c ", "white space"),
            ("/a :/c", "white space"),
        ] {
            let e = one_error(&format!("service_dir = \"/x\"\nbinds = [{spec:?}]\n"));
            assert!(e.contains(why), "{spec}: {e}");
        }
        let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \"n\"\nexternal = true\nargs = [\"K=a=b\"]\n");
        assert!(e.contains("\"K=a=b\" is not one KEY=VALUE (one '='"), "{e}");
    }

    #[test]
    fn bind_onto_the_root_is_refused() {
        for spec in ["/srv/r:/", "/", "/srv/r:/.:ro"] {
            let e = one_error(&format!("service_dir = \"/x\"\nbinds = [{spec:?}]\n"));
            assert!(
                e.contains("the target is the container's root"),
                "{spec}: {e}"
            );
        }
    }

    #[test]
    fn equivalent_bind_targets_are_one_target() {
        let e = one_error("service_dir = \"/x\"\nbinds = [\"/a:/d\", \"/b:/d/\"]\n");
        assert!(e.contains("is mounted at /d already"), "{e}");
        let e = one_error("service_dir = \"/x\"\nbinds = [\"/d\", \"/b://d\"]\n");
        assert!(e.contains("\"/b://d\" is mounted at /d already"), "{e}");
    }

    #[test]
    fn name_must_match_lookup() {
        let e = parse(
            "name = \"ood002\"\nservice_dir = \"/x\"",
            Path::new("/e/ood001.toml"),
            Some("ood001"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("name: is \"ood002\", but the file was loaded as \"ood001\""),
            "{e}"
        );
    }

    #[test]
    fn all_errors_are_collected() {
        let e = p(
            "name = \"a b\"\nservice_dir = \"rel\"\nbinds = [\"x\"]\n[overlay]\nsize_mib = 10\n",
        )
        .unwrap_err();
        let keys: Vec<_> = e.issues().iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["name", "service_dir", "binds", "overlay.size_mib"]);
    }

    #[test]
    fn relative_overlay_resolves_in_service_dir() {
        let s = p("service_dir = \"/srv/ww001\"\n[overlay]\npath = \"overlay.img\"\n").unwrap();
        assert_eq!(s.overlay.path, Path::new("/srv/ww001/overlay.img"));
    }

    #[test]
    fn unknown_substitution_is_refused() {
        let e = one_error("service_dir = \"/x\"\nimage = \"${DIRNAME}/c.sif\"\n");
        assert!(e.contains("image: unknown substitution ${DIRNAME}"), "{e}");
    }

    #[test]
    fn parent_dir_is_refused() {
        let e = one_error("service_dir = \"/srv/../etc\"\n");
        assert!(
            e.contains("service_dir: \"/srv/../etc\" contains \"..\""),
            "{e}"
        );
    }

    #[test]
    fn network_names_unique_and_args_checked() {
        let e = p("service_dir = \"/x\"\n[[network]]\nname = \"a\"\nexternal = true\n[[network]]\nname = \"a\"\nargs = [\"nokv\"]\nexternal = true\n").unwrap_err();
        let r: Vec<_> = e
            .issues()
            .iter()
            .map(|i| (i.line, i.key.as_str()))
            .collect();
        assert_eq!(r, [(6, "network.name"), (7, "network.args")]);
    }

    fn net(body: &str) -> Result<Service, ConfigError> {
        p(&format!(
            "service_dir = \"/x\"\n[[network]]\nname = \"n\"\n{body}"
        ))
    }

    #[test]
    fn network_cni_keys_are_validated() {
        let ok = net("type = \"macvlan\"\nmaster = \"p0\"\nmode = \"bridge\"\nmtu = 1500\nmac = \"02:00:00:00:00:01\"\n[network.ipam]\ntype = \"static\"\naddresses = [\"10.0.0.2/24\"]\ngateway = \"10.0.0.1\"\nroutes = [\"0.0.0.0/0\", \"10.9.0.0/16 via 10.0.0.254\"]\n").unwrap();
        let cni = ok.networks[0].cni.as_ref().unwrap();
        assert_eq!(cni.kind, CniKind::Macvlan);
        assert!(matches!(&cni.ipam, Ipam::Static { routes, .. } if routes.len() == 2));
        let cases: &[(&str, &str, &str)] = &[
            ("[network.ipam]\ntype = \"dhcp\"\n", "network.type", "missing:"),
            ("type = \"macvlan\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.master", "needs its parent interface"),
            ("type = \"macvlan\"\nmaster = \"p0\"\nmode = \"l2\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.mode", "\"l2\" is not a macvlan mode"),
            ("type = \"bridge\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.master", "a bridge network has no master"),
            ("type = \"macvlan\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"static\"\naddresses = [\"10.0.0.2\"]\n", "network.ipam.addresses", "needs a prefix length"),
            ("type = \"macvlan\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"static\"\naddresses = [\"10.0.0.2/24\"]\ngateway = \"10.0.1.1\"\n", "network.ipam.gateway", "10.0.1.1 is outside the subnet"),
            ("type = \"bridge\"\n[network.ipam]\ntype = \"host-local\"\nsubnet = \"10.22.0.0/16\"\nrange_start = \"10.23.0.1\"\n", "network.ipam.range_start", "10.23.0.1 is outside subnet 10.22.0.0/16"),
            ("type = \"macvlan\"\nmaster = \"p0\"\nmtu = 20\n[network.ipam]\ntype = \"dhcp\"\n", "network.mtu", "between 68 and 65535"),
            ("type = \"macvlan\"\nmaster = \"p0\"\nmac = \"zz\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.mac", "not a MAC"),
            ("type = \"macvlan\"\nmaster = \"p0\"\n", "network.ipam.type", "missing: the [network.ipam] table"),
            ("type = \"macvlan\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"dhcp\"\nrouts = []\n", "network.ipam.routs", "unknown field `routs`"),
            ("external = true\ntype = \"macvlan\"\n", "network.external", "cannot be set here"),
        ];
        for (body, key, reason) in cases {
            let e = net(body).expect_err(body);
            let i = &e.issues()[0];
            assert_eq!(i.key, *key, "{body}: {e}");
            assert!(i.reason.contains(reason), "{body}: {e}");
        }
    }

    #[test]
    fn ipnet_contains() {
        let n = IpNet::parse("10.1.225.1/16").unwrap();
        assert!(n.contains("10.1.224.51".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(IpNet::parse("fd00::1/64")
            .unwrap()
            .contains("fd00::99".parse().unwrap()));
        assert!(IpNet::parse("10.0.0.1/33").is_err());
    }

    #[test]
    fn env_file_parses_without_a_shell() {
        let env = parse_env_file("# c\n\nexport A=1\nB=\"two words\"\nC='$HOME'\nD=\n").unwrap();
        assert_eq!(
            env,
            [("A", "1"), ("B", "two words"), ("C", "$HOME"), ("D", "")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(parse_env_file("A=1\nnot a line\n").unwrap_err().0, 2);
        assert_eq!(parse_env_file("X=$(rm -rf /)\n").unwrap_err().0, 1);
        assert_eq!(parse_env_file("1X=a\n").unwrap_err().0, 1);
        assert_eq!(parse_env_file("X=\"a\n").unwrap_err().0, 1);
    }

    #[test]
    fn readiness_defaults_follow_boot() {
        let s = p("service_dir = \"/x\"\n").unwrap();
        assert_eq!(s.readiness.mode, ReadinessMode::InnerSystemd);
        assert_eq!(s.readiness.on_failure, OnFailure::RestartUnit);
        assert!(s.readiness.accept_degraded);
        let s = p("service_dir = \"/x\"\nboot = false\n").unwrap();
        assert_eq!(s.readiness.mode, ReadinessMode::Instance);
    }

    #[test]
    fn readiness_units_are_checked() {
        let e = p("service_dir = \"/x\"\n[readiness]\nrequired_units = [\"httpd\", \"a.service\", \"a.service\"]\n").unwrap_err();
        let r: Vec<_> = e
            .issues()
            .iter()
            .map(|i| (i.column, i.reason.clone()))
            .collect();
        assert_eq!(
            r[0].1,
            "\"httpd\" is not a unit name with its type (e.g. \"httpd.service\")"
        );
        assert_eq!(r[1].1, "\"a.service\" is listed twice");
        let e = one_error("service_dir = \"/x\"\n[readiness]\nmode = \"instance\"\nrequired_units = [\"a.service\"]\n");
        assert!(
            e.contains("readiness.required_units: required units need readiness.mode"),
            "{e}"
        );
        let e = one_error(
            "service_dir = \"/x\"\nboot = false\n[readiness]\nmode = \"inner-systemd\"\n",
        );
        assert!(
            e.contains("4:8: readiness.mode: \"inner-systemd\" needs boot = true"),
            "{e}"
        );
        let e = one_error("service_dir = \"/x\"\n[readiness]\non_failure = \"reboot\"\n");
        assert!(
            e.contains("3:14: readiness.on_failure: unknown variant `reboot`"),
            "{e}"
        );
    }

    #[test]
    fn unit_and_install_tables_are_read() {
        let s = p("service_dir = \"/x\"\n[unit]\ndescription = \"OOD portal\"\ndocumentation = [\"https://example.org/ood\"]\nafter = [\"munge.service\"]\nwants = [\"getty@tty1.service\"]\n[install]\nwanted_by = [\"multi-user.target\"]\n").unwrap();
        assert_eq!(s.unit.description.as_deref(), Some("OOD portal"));
        assert_eq!(s.unit.after, ["munge.service"]);
        assert_eq!(s.unit.wants, ["getty@tty1.service"]);
        assert_eq!(s.install.wanted_by, ["multi-user.target"]);
        assert!(s.install.required_by.is_empty() && s.unit.before.is_empty());
        assert_eq!(p(OOD).unwrap().unit, UnitDeps::default());
    }

    #[test]
    fn unit_and_install_values_are_checked() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[unit]\nafter = [\"munge\"]\n",
                "3:10: unit.after",
                "\"munge\" is not a unit name with its type",
            ),
            (
                "[unit]\nwants = [\"getty@.service\"]\n",
                "3:10: unit.wants",
                "is a template; name an instance (getty@NAME.service)",
            ),
            (
                "[unit]\nrequires = [\"a b.service\"]\n",
                "3:13: unit.requires",
                "characters systemd does not allow",
            ),
            (
                "[unit]\nbefore = [\"a@b@c.service\"]\n",
                "3:11: unit.before",
                "more than one '@'",
            ),
            (
                "[unit]\nafter = [\"@x.service\"]\n",
                "3:10: unit.after",
                "no name before",
            ),
            (
                "[unit]\nafter = [\"x.target\", \"x.target\"]\n",
                "3:22: unit.after",
                "listed twice",
            ),
            (
                "[unit]\nafter = [\"ood001.service\"]\n",
                "3:10: unit.after",
                "the generated unit itself",
            ),
            (
                "[unit]\ndescription = \"a\\nb\"\n",
                "3:15: unit.description",
                "control character",
            ),
            (
                "[unit]\ndocumentation = [\"www.example.org\"]\n",
                "3:18: unit.documentation",
                "is not an http:",
            ),
            (
                "[unit]\ndocumentation = [\"man:a b\"]\n",
                "3:18: unit.documentation",
                "contains a space",
            ),
            (
                "[unit]\nafer = []\n",
                "3:1: unit.afer",
                "unknown field `afer`",
            ),
            (
                "[install]\nwanted_by = [\"multi-user\"]\n",
                "3:14: install.wanted_by",
                "not a unit name",
            ),
            (
                "[install]\nalso = []\n",
                "3:1: install.also",
                "unknown field `also`",
            ),
        ];
        for (body, at, reason) in cases {
            let e = one_error(&format!("service_dir = \"/x\"\n{body}"));
            assert!(e.contains(&format!("ood001.toml:{at}: ")), "{body}: {e}");
            assert!(e.contains(reason), "{body}: {e}");
        }
    }

    #[test]
    fn key_at_finds_tables() {
        let t = "a = 1\n[[network]]\nname = 2\n";
        assert_eq!(key_at(t, t.find("2").unwrap()), "network.name");
        assert_eq!(key_at(t, 0), "a");
    }

    #[test]
    fn capability_names_parse_as_capabilities7_spells_them() {
        assert_eq!(
            parse_cap("CAP_SYS_TIME"),
            Ok(caps::Capability::CAP_SYS_TIME)
        );
        assert_eq!(parse_cap("sys_time"), Ok(caps::Capability::CAP_SYS_TIME));
        assert!(parse_cap("CAP_FLY")
            .unwrap_err()
            .contains("not a Linux capability"));
    }

    #[test]
    fn networks_are_only_named_in_network_tables() {
        let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \"none\"\nexternal = true\n");
        assert!(
            e.contains("3:8: network.name: \"none\" is Apptainer's \"no network\""),
            "{e}"
        );
        for arg in ["--network", "--network=bridge"] {
            let e = one_error(&format!(
                "service_dir = \"/x\"\n[apptainer]\nextra_args = [\"{arg}\"]\n"
            ));
            assert!(
                e.contains("apptainer.extra_args: \"--network")
                    && e.contains("networks are set with [[network]]"),
                "{e}"
            );
        }
        // Apptainer's bridge without external = true: the hint says what it is.
        let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \"bridge\"\n");
        assert!(e.contains("Apptainer's own default network"), "{e}");
        let s =
            p("service_dir = \"/x\"\n[[network]]\nname = \"bridge\"\nexternal = true\n").unwrap();
        assert!(s.networks[0].cni.is_none());
    }

    #[test]
    fn env_may_not_move_apptainers_state() {
        for k in STATE_DIR_ENV {
            let e = one_error(&format!("service_dir = \"/x\"\n[env]\n{k} = \"/srv\"\n"));
            assert!(
                e.contains(&format!(
                    "3:1: env: {k} would move Apptainer's instance state"
                )),
                "{e}"
            );
        }
    }
}
