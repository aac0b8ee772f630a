//! CNI network configs: each owned `[[network]]` rendered as a conflist, written atomically
//! into Apptainer's `cni configuration path` only when its content changes, and never over
//! a file the supervisor did not write (unless the service says `manage = true`).
//!
//! The shape is Apptainer's shipped `etc/network/30_macvlan.conflist` (CNI spec 1.0.0).
//! Apptainer's `--network NAME` selects a conflist by its `"name"` field (libcni
//! `LoadConfList`), so the file is `<name>.conflist` and no other file in the directory may
//! carry the same name.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::{Cni, CniKind, Ipam, Network, Route, Service};

pub const CNI_VERSION: &str = "1.0.0";

/// Top-level key that marks a conflist as ours. libcni reads only `name`, `cniVersion`,
/// `disableCheck` and `plugins` at the top level, so the plugins never see it.
pub const MARKER: &str = "apptainerSupervisor";

/// The conflist for one owned network of `service`, as JSON text (stable key order).
pub fn render(service: &str, n: &Network, cni: &Cni) -> String {
    let mut plugin = Map::new();
    plugin.insert("type".into(), json!(cni.kind.as_str()));
    match cni.kind {
        CniKind::Macvlan | CniKind::Ipvlan => {
            if let Some(m) = &cni.master {
                plugin.insert("master".into(), json!(m));
            }
        }
        CniKind::Bridge => {
            plugin.insert(
                "bridge".into(),
                json!(cni.bridge.clone().unwrap_or_else(|| "cni0".into())),
            );
        }
    }
    if let Some(mode) = &cni.mode {
        plugin.insert("mode".into(), json!(mode));
    }
    if let Some(mtu) = cni.mtu {
        plugin.insert("mtu".into(), json!(mtu));
    }
    if let Some(mac) = &cni.mac {
        plugin.insert("mac".into(), json!(mac));
    }
    plugin.insert("ipam".into(), ipam(&cni.ipam));
    let list = json!({
        "cniVersion": CNI_VERSION,
        "name": n.name,
        MARKER: {
            "service": service,
            "note": format!("written by apptainer-supervisor from the {service} service file; edit that file, not this one"),
        },
        "plugins": [Value::Object(plugin)],
    });
    let mut text = serde_json::to_string_pretty(&list).expect("a JSON value always serialises");
    text.push('\n');
    text
}

fn routes(rs: &[Route]) -> Value {
    Value::Array(
        rs.iter()
            .map(|r| match r.gw {
                Some(gw) => json!({"dst": r.dst.to_string(), "gw": gw.to_string()}),
                None => json!({"dst": r.dst.to_string()}),
            })
            .collect(),
    )
}

fn ipam(i: &Ipam) -> Value {
    match i {
        Ipam::Static {
            addresses,
            gateway,
            routes: rs,
        } => {
            let addrs: Vec<Value> = addresses
                .iter()
                .map(|a| match gateway.filter(|g| a.contains(*g)) {
                    Some(g) => json!({"address": a.to_string(), "gateway": g.to_string()}),
                    None => json!({"address": a.to_string()}),
                })
                .collect();
            let mut m = Map::new();
            m.insert("type".into(), json!("static"));
            m.insert("addresses".into(), Value::Array(addrs));
            if !rs.is_empty() {
                m.insert("routes".into(), routes(rs));
            }
            Value::Object(m)
        }
        Ipam::HostLocal {
            subnet,
            range_start,
            range_end,
            gateway,
            routes: rs,
            data_dir,
        } => {
            let mut range = Map::new();
            range.insert("subnet".into(), json!(network_of(subnet).to_string()));
            if let Some(s) = range_start {
                range.insert("rangeStart".into(), json!(s.to_string()));
            }
            if let Some(e) = range_end {
                range.insert("rangeEnd".into(), json!(e.to_string()));
            }
            if let Some(g) = gateway {
                range.insert("gateway".into(), json!(g.to_string()));
            }
            let mut m = Map::new();
            m.insert("type".into(), json!("host-local"));
            m.insert("ranges".into(), json!([[Value::Object(range)]]));
            if !rs.is_empty() {
                m.insert("routes".into(), routes(rs));
            }
            if let Some(d) = data_dir {
                m.insert("dataDir".into(), json!(d.display().to_string()));
            }
            Value::Object(m)
        }
        Ipam::Dhcp => json!({"type": "dhcp"}),
    }
}

/// `10.22.3.4/16` → `10.22.0.0/16`: host-local wants the network address.
fn network_of(n: &crate::config::IpNet) -> crate::config::IpNet {
    use std::net::IpAddr::*;
    let addr = match n.addr {
        V4(v) => {
            let mask = if n.prefix == 0 {
                0
            } else {
                u32::MAX << (32 - n.prefix as u32)
            };
            V4((u32::from(v) & mask).into())
        }
        V6(v) => {
            let mask = if n.prefix == 0 {
                0
            } else {
                u128::MAX << (128 - n.prefix as u32)
            };
            V6((u128::from(v) & mask).into())
        }
    };
    crate::config::IpNet {
        addr,
        prefix: n.prefix,
    }
}

/// Where one network's conflist goes.
pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.conflist"))
}

/// What writing one conflist did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Created,
    Unchanged,
    /// Rewritten; the top-level plugin keys whose value changed.
    Changed(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{path}: not written by apptainer-supervisor, left untouched\n  hint: set manage = true in the [[network]] table of {name} to take it over, or external = true to use it as it is")]
    NotOurs { path: PathBuf, name: String },
    #[error("{path}: also defines network {name:?} (Apptainer would pick one of them by file order)\n  hint: remove one of the two")]
    DuplicateName { path: PathBuf, name: String },
    #[error("network {name} is external, but no conflist in {dir} has \"name\": {name:?}")]
    ExternalMissing { name: String, dir: PathBuf },
    #[error("parent interface {master:?} of network {name} {problem} on this host")]
    Parent {
        name: String,
        master: String,
        problem: &'static str,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl NetworkError {
    /// The network a problem is about, when it is about one.
    pub fn network(&self) -> Option<&str> {
        match self {
            NetworkError::NotOurs { name, .. }
            | NetworkError::DuplicateName { name, .. }
            | NetworkError::ExternalMissing { name, .. }
            | NetworkError::Parent { name, .. } => Some(name),
            NetworkError::Write { .. } => None,
        }
    }
}

/// The `"name"` of every conflist in `dir` (file → name), as libcni would read them.
pub fn names_in(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let ext_ok = p
            .extension()
            .is_some_and(|x| x == "conflist" || x == "conf" || x == "json");
        if !ext_ok {
            continue;
        }
        let name = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned));
        if let Some(name) = name {
            out.insert(p, name);
        }
    }
    out
}

fn is_ours(text: &[u8], service: &str) -> bool {
    serde_json::from_slice::<Value>(text)
        .ok()
        .and_then(|v| {
            v.get(MARKER)?
                .get("service")?
                .as_str()
                .map(|s| s == service)
        })
        .unwrap_or(false)
}

/// Top-level plugin keys that differ between two conflists (for the log line).
fn changed_keys(old: &[u8], new: &str) -> Vec<String> {
    let plugin = |v: &Value| {
        v.get("plugins")
            .and_then(|p| p.get(0))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (Ok(o), Ok(n)) = (
        serde_json::from_slice::<Value>(old),
        serde_json::from_str::<Value>(new),
    ) else {
        return vec!["(whole file)".into()];
    };
    let (po, pn) = (plugin(&o), plugin(&n));
    let mut keys: Vec<String> = Vec::new();
    if let (Some(a), Some(b)) = (po.as_object(), pn.as_object()) {
        for k in a.keys().chain(b.keys()) {
            if a.get(k) != b.get(k) && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    for k in ["cniVersion", "name"] {
        if o.get(k) != n.get(k) {
            keys.push(k.into());
        }
    }
    if keys.is_empty() {
        keys.push("(formatting)".into());
    }
    keys
}

/// Writes every owned network's conflist of `s` into its network directory, and checks the
/// external ones exist. Returns what happened per file.
pub fn sync(s: &Service) -> Result<Vec<(PathBuf, Written)>, NetworkError> {
    reconcile(s, true)
}

/// What [`sync`] would do, without writing (`check --host`).
pub fn dry_run(s: &Service) -> Result<Vec<(PathBuf, Written)>, NetworkError> {
    reconcile(s, false)
}

fn reconcile(s: &Service, write: bool) -> Result<Vec<(PathBuf, Written)>, NetworkError> {
    let dir = &s.apptainer.network_dir;
    let existing = names_in(dir);
    let mut out = Vec::new();
    for n in &s.networks {
        let target = path(dir, &n.name);
        let Some(cni) = &n.cni else {
            if !existing.values().any(|name| *name == n.name) {
                return Err(NetworkError::ExternalMissing {
                    name: n.name.clone(),
                    dir: dir.clone(),
                });
            }
            continue;
        };
        if let Some((other, _)) = existing
            .iter()
            .find(|(p, name)| **name == n.name && **p != target)
        {
            return Err(NetworkError::DuplicateName {
                path: other.clone(),
                name: n.name.clone(),
            });
        }
        let text = render(&s.name, n, cni);
        let written = match std::fs::read(&target) {
            Ok(old) if old == text.as_bytes() => Written::Unchanged,
            Ok(old) if is_ours(&old, &s.name) || n.manage => {
                Written::Changed(changed_keys(&old, &text))
            }
            Ok(_) => {
                return Err(NetworkError::NotOurs {
                    path: target,
                    name: n.name.clone(),
                })
            }
            Err(_) => Written::Created,
        };
        if write && written != Written::Unchanged {
            let err = |source| NetworkError::Write {
                path: target.clone(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(err)?;
            crate::os::fsutil::write_atomic(&target, text.as_bytes(), 0o644).map_err(err)?;
        }
        out.push((target, written));
    }
    Ok(out)
}

/// The parent interface of each macvlan/ipvlan network exists and is up in this process's
/// network namespace (SIOCGIFFLAGS on a socket of that namespace: `/sys/class/net` shows
/// the namespace of whoever mounted sysfs, which need not be ours).
pub fn check_parents(s: &Service) -> Result<(), NetworkError> {
    for n in &s.networks {
        let Some(master) = n.cni.as_ref().and_then(|c| c.master.as_ref()) else {
            continue;
        };
        let problem = match if_flags(master) {
            Err(_) => Some("does not exist"),
            Ok(flags) => (flags & libc::IFF_UP as u32 == 0).then_some("is down"),
        };
        if let Some(problem) = problem {
            return Err(NetworkError::Parent {
                name: n.name.clone(),
                master: master.clone(),
                problem,
            });
        }
    }
    Ok(())
}

/// The interface flags of `name` (netdevice(7), SIOCGIFFLAGS).
fn if_flags(name: &str) -> io::Result<u32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    // SAFETY: socket(2) with constant arguments returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads ifr_name and writes ifr_ifru.ifru_flags of a valid ifreq.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful SIOCGIFFLAGS the flags member is the one written.
    Ok(unsafe { req.ifr_ifru.ifru_flags } as u16 as u32)
}

/// The container's first IPv4 address, read from its own network namespace
/// (`/proc/<pid>/net/fib_trie`: the `/32 host LOCAL` entries), when Apptainer's state file
/// has none (a hand-managed network whose result carried no address, for example).
pub fn container_ip(pid: i32) -> Option<String> {
    // Sharing our namespace (no --net): its addresses are the host's, not its own.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    if ns(&pid.to_string()) == ns("self") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/fib_trie")).ok()?;
    local_ipv4(&text)
}

fn local_ipv4(fib_trie: &str) -> Option<String> {
    let mut last: Option<&str> = None;
    for line in fib_trie.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = Some(addr);
        } else if t == "/32 host LOCAL" {
            if let Some(a) = last.filter(|a| !a.starts_with("127.")) {
                return Some(a.to_owned());
            }
        }
    }
    None
}

/// Static addresses that this service and another one both claim.
pub fn address_conflicts<'a>(
    me: &Service,
    others: impl Iterator<Item = &'a Service>,
) -> Vec<(String, String, String)> {
    let statics = |s: &Service| -> Vec<(String, std::net::IpAddr)> {
        s.networks
            .iter()
            .filter_map(|n| n.cni.as_ref().map(|c| (n.name.clone(), &c.ipam)))
            .flat_map(|(name, ipam)| match ipam {
                Ipam::Static { addresses, .. } => {
                    addresses.iter().map(|a| (name.clone(), a.addr)).collect()
                }
                _ => Vec::new(),
            })
            .collect()
    };
    let mine = statics(me);
    let mut out = Vec::new();
    for o in others {
        for (theirs_net, ip) in statics(o) {
            if let Some((my_net, _)) = mine.iter().find(|(_, m)| *m == ip) {
                out.push((
                    ip.to_string(),
                    my_net.clone(),
                    format!("{} ({theirs_net})", o.name),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn svc(text: &str, dir: &Path) -> Service {
        let text = format!("{text}\n[apptainer]\nnetwork_dir = \"{}\"\n", dir.display());
        parse(
            &text,
            Path::new("/etc/apptainer-supervisor/ood001.toml"),
            None,
        )
        .unwrap()
    }

    const OOD: &str = r#"
service_dir = "/srv/ood001"
[[network]]
name = "macvlan_ood001"
type = "macvlan"
master = "eth0"
mode = "bridge"
[network.ipam]
type = "static"
addresses = ["10.1.225.1/16"]
gateway = "10.1.224.51"
routes = ["0.0.0.0/0"]
"#;

    #[test]
    fn renders_apptainers_macvlan_shape() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(OOD, d.path());
        let n = &s.networks[0];
        let v: Value = serde_json::from_str(&render("ood001", n, n.cni.as_ref().unwrap())).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "macvlan_ood001");
        assert_eq!(
            v["plugins"][0],
            json!({"type": "macvlan", "master": "eth0", "mode": "bridge",
                   "ipam": {"type": "static",
                            "addresses": [{"address": "10.1.225.1/16", "gateway": "10.1.224.51"}],
                            "routes": [{"dst": "0.0.0.0/0"}]}})
        );
    }

    #[test]
    fn host_local_bridge_uses_the_network_address() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(
            r#"service_dir = "/srv/ww001"
[[network]]
name = "ipmi_bridge_ww001"
type = "bridge"
bridge = "br-ipmi"
[network.ipam]
type = "host-local"
subnet = "192.168.1.7/24"
range_start = "192.168.1.100"
range_end = "192.168.1.120"
"#,
            d.path(),
        );
        let n = &s.networks[0];
        let v: Value = serde_json::from_str(&render("ww001", n, n.cni.as_ref().unwrap())).unwrap();
        assert_eq!(v["plugins"][0]["bridge"], "br-ipmi");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0],
            json!({"subnet": "192.168.1.0/24", "rangeStart": "192.168.1.100", "rangeEnd": "192.168.1.120"})
        );
    }

    #[test]
    fn written_once_rewritten_only_on_change_and_never_over_a_foreign_file() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(OOD, d.path());
        let file = path(d.path(), "macvlan_ood001");
        assert_eq!(sync(&s).unwrap(), [(file.clone(), Written::Created)]);
        assert_eq!(sync(&s).unwrap(), [(file.clone(), Written::Unchanged)]);
        let s2 = svc(
            &OOD.replace("mode = \"bridge\"", "mode = \"private\""),
            d.path(),
        );
        assert_eq!(
            sync(&s2).unwrap(),
            [(file.clone(), Written::Changed(vec!["mode".into()]))]
        );
        // A hand-written (Ansible) file of that name is left alone…
        std::fs::write(
            &file,
            "{\"cniVersion\":\"1.0.0\",\"name\":\"macvlan_ood001\",\"plugins\":[]}",
        )
        .unwrap();
        let err = sync(&s).unwrap_err().to_string();
        assert!(
            err.contains("not written by apptainer-supervisor, left untouched"),
            "{err}"
        );
        assert!(std::fs::read_to_string(&file)
            .unwrap()
            .contains("\"plugins\":[]"));
        // …unless the service takes it over.
        let s3 = svc(
            &OOD.replace("mode = \"bridge\"", "mode = \"bridge\"\nmanage = true"),
            d.path(),
        );
        assert!(matches!(&sync(&s3).unwrap()[0].1, Written::Changed(_)));
    }

    #[test]
    fn a_second_file_with_the_same_name_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("30_macvlan.conflist"),
            "{\"name\":\"macvlan_ood001\"}",
        )
        .unwrap();
        let err = sync(&svc(OOD, d.path())).unwrap_err().to_string();
        assert!(
            err.contains("30_macvlan.conflist: also defines network \"macvlan_ood001\""),
            "{err}"
        );
    }

    #[test]
    fn external_network_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let s = svc(
            "service_dir = \"/x\"\n[[network]]\nname = \"site_net\"\nexternal = true\n",
            d.path(),
        );
        assert!(sync(&s).unwrap_err().to_string().contains("no conflist in"));
        std::fs::write(d.path().join("00_site.conflist"), "{\"name\":\"site_net\"}").unwrap();
        assert_eq!(sync(&s).unwrap(), []);
    }

    #[test]
    fn parent_interface_must_exist_and_be_up() {
        let d = tempfile::tempdir().unwrap();
        let missing = svc(
            &OOD.replace("master = \"eth0\"", "master = \"asv-none0\""),
            d.path(),
        );
        assert!(check_parents(&missing)
            .unwrap_err()
            .to_string()
            .contains("\"asv-none0\" of network macvlan_ood001 does not exist"));
        // Loopback exists and is up in every network namespace a test runs in.
        let lo = svc(
            &OOD.replace("master = \"eth0\"", "master = \"lo\""),
            d.path(),
        );
        check_parents(&lo).unwrap();
        assert_ne!(if_flags("lo").unwrap() & libc::IFF_LOOPBACK as u32, 0);
    }

    #[test]
    fn local_address_from_fib_trie() {
        let trie = "Main:\n  +-- 0.0.0.0/1 2 0 2\n     |-- 10.98.0.0\n        /24 link UNICAST\n     |-- 10.98.0.2\n        /32 host LOCAL\n     |-- 127.0.0.1\n        /32 host LOCAL\n";
        assert_eq!(local_ipv4(trie).as_deref(), Some("10.98.0.2"));
        assert_eq!(
            local_ipv4("Main:\n     |-- 127.0.0.1\n        /32 host LOCAL\n"),
            None
        );
        assert_eq!(
            container_ip(std::process::id() as i32),
            None,
            "our own namespace is not a container's"
        );
    }

    #[test]
    fn static_address_conflicts_are_found() {
        let d = tempfile::tempdir().unwrap();
        let a = svc(OOD, d.path());
        let b = parse(
            &OOD.replace("macvlan_ood001", "macvlan_ood002"),
            Path::new("/etc/apptainer-supervisor/ood002.toml"),
            None,
        )
        .unwrap();
        let c = address_conflicts(&a, [&b].into_iter());
        assert_eq!(
            c,
            [(
                "10.1.225.1".to_string(),
                "macvlan_ood001".to_string(),
                "ood002 (macvlan_ood002)".to_string()
            )]
        );
    }
}
