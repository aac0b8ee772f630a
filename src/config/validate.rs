//! Raw → [`Service`]: every value checked, every path made absolute, every default filled
//! in, all problems collected before giving up.

use super::*;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) issues: Vec<Issue>,
}

impl Validator<'_> {
    pub(super) fn push(
        &mut self,
        offset: usize,
        key: &str,
        reason: impl Into<String>,
        hint: Option<&str>,
    ) {
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

    pub(super) fn service(
        &mut self,
        raw: RawService,
        path: &Path,
        expected: Option<&str>,
    ) -> Service {
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
        // With --boot and no --hostname, Apptainer makes the instance's name its host name
        // (internal/pkg/runtime/launch/launcher_linux.go v1.3.6:371, v1.4.5:369) and then
        // refuses one its host-name rule does not accept: every start would fail.
        if raw.boot && hostname.is_none() && check_name(&name).is_ok() {
            if let Err(reason) = check_hostname(&name) {
                let offset = raw.name.as_ref().map_or(0, |n| n.span().start);
                let suggestion = name.replace(['_', '.'], "-");
                let suggestion = suggestion.trim_matches('-');
                self.push(
                    offset,
                    keys::NAME,
                    format!(
                        "a booted instance takes its name as host name, and Apptainer would refuse it: {reason}"
                    ),
                    Some(&format!(
                        "set a host name Apptainer accepts, e.g. hostname = \"{suggestion}\""
                    )),
                );
            }
        }

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
            allow_local_locks: raw.overlay.allow_local_locks.unwrap_or(false),
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
        let update = Update {
            probation_sec: raw
                .update
                .probation_sec
                .as_ref()
                .map_or(DEFAULT_PROBATION_SEC, |v| *v.get_ref()),
            keep: raw
                .update
                .keep
                .as_ref()
                .map_or(DEFAULT_KEEP, |v| *v.get_ref()),
        };
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
            trusted_owners: raw
                .security
                .trusted_owners
                .iter()
                .filter_map(|u| match u32::try_from(*u.get_ref()) {
                    // (uid_t)-1 means "no change" to chown(2): it owns nothing.
                    Ok(uid) if uid != u32::MAX => Some(uid),
                    _ => {
                        self.push(
                            u.span().start,
                            keys::SECURITY_TRUSTED_OWNERS,
                            format!("{} is not a uid", u.get_ref()),
                            Some("numeric uids, e.g. trusted_owners = [65534] for root_squash NFS"),
                        );
                        None
                    }
                })
                .collect(),
            strict_paths: raw.security.strict_paths.unwrap_or(false),
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
            (keys::IMAGE_URL, raw.image_url.as_ref()),
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
            image_url: raw.image_url.map(Spanned::into_inner),
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
            update,
            lines,
        }
    }

    /// A path that must come out absolute after substitution. `base` allows a relative
    /// value, resolved against it (the service directory).
    pub(super) fn abs_path(
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

    pub(super) fn opt_path(
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

    pub(super) fn binds(&mut self, raw: &[Spanned<String>], subst: &Subst) -> Vec<Bind> {
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

    pub(super) fn networks(&mut self, raw: &[RawNetwork]) -> Vec<Network> {
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
    pub(super) fn cni(&mut self, n: &RawNetwork) -> Option<Cni> {
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

    pub(super) fn ip(&mut self, v: &Spanned<String>, key: &str) -> Option<std::net::IpAddr> {
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

    pub(super) fn routes(&mut self, raw: &[Spanned<String>]) -> Vec<Route> {
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

    pub(super) fn ipam(&mut self, raw: &RawIpam, at: usize) -> Option<Ipam> {
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

    pub(super) fn readiness(&mut self, raw: &RawReadiness, boot: bool) -> Readiness {
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
    pub(super) fn unit_deps(&mut self, raw: &RawUnit, name: &str) -> UnitDeps {
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
    pub(super) fn host_units(
        &mut self,
        raw: &[Spanned<String>],
        key: &str,
        name: &str,
    ) -> Vec<String> {
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

    pub(super) fn timeouts(&mut self, raw: &RawTimeouts) -> Timeouts {
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
            overlay_create_sec: raw.overlay_create_sec.as_ref().map(|_| {
                get(
                    &raw.overlay_create_sec,
                    keys::TIMEOUTS_OVERLAY_CREATE_SEC,
                    60,
                    1,
                )
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small pure checks

/// `${service_dir}` and `${name}` — the places where start.sh used `$DIRNAME` and the
/// service name. Nothing else is expanded, and no shell ever sees the value.
pub(super) struct Subst<'a> {
    name: &'a str,
    service_dir: Option<&'a Path>,
}

impl Subst<'_> {
    pub(super) fn apply(&self, s: &str) -> Result<String, String> {
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
