//! The CNI DEL that a dead Apptainer master never ran.
//!
//! Apptainer's master releases the container's networks when the container exits
//! (internal/pkg/runtime/engine/apptainer/cleanup_linux.go: `CleanupContainer` →
//! pkg/network `DelNetworks`). A master killed with SIGKILL never does, so an IPAM lease
//! (host-local keeps one file per address) stays taken until someone deletes it: after a
//! few such deaths a small range is exhausted and the service can no longer start. This
//! module runs that DEL for it, as libcni's `DelNetworkList` would (containernetworking/cni
//! libcni/api.go): each network's plugins in reverse order, `CNI_COMMAND=DEL`,
//! `CNI_CONTAINERID` = the container's pid (Apptainer's `NewSetup(networks,
//! strconv.Itoa(pid), ...)`), `CNI_IFNAME=eth<i>`, and an empty `CNI_NETNS`: the container's
//! namespace is gone, and the reference plugins then release their IPAM state only
//! (plugins/main/{bridge,macvlan,ipvlan}: `if args.Netns == "" { return nil }` after
//! `ipam.ExecDel`). A DEL is idempotent, so running it for a lease already released is
//! harmless.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::config::Service;

/// Where the plugins are when `apptainer.conf` does not say (its `cni plugin path`
/// directive, pkg/util/apptainerconf/config.go): Apptainer's default, Debian's
/// containernetworking-plugins, the CNI project's convention.
const DEFAULT_PLUGIN_DIRS: &[&str] =
    &["/usr/libexec/apptainer/cni", "/usr/lib/cni", "/opt/cni/bin"];

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("reading {path}: {source}")]
    ReadConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a CNI conflist: {reason}")]
    BadConf { path: PathBuf, reason: String },
    #[error("no CNI configuration in {dir} has \"name\": {network:?}")]
    NotFound { network: String, dir: PathBuf },
    #[error("CNI plugin {plugin:?} of network {network} not found in {dirs}")]
    NoPlugin {
        network: String,
        plugin: String,
        dirs: String,
    },
    #[error("running CNI plugin {plugin} (DEL) for network {network}: {source}")]
    Run {
        network: String,
        plugin: String,
        #[source]
        source: io::Error,
    },
    #[error("CNI plugin {plugin} (DEL) for network {network} failed ({status}): {output}")]
    Failed {
        network: String,
        plugin: String,
        status: String,
        output: String,
    },
    #[error("CNI plugin {plugin} (DEL) for network {network} did not finish within {secs} s")]
    TimedOut {
        network: String,
        plugin: String,
        secs: u64,
    },
}

/// The plugin directories to search, first the one `apptainer.conf` names. Apptainer's
/// `cni configuration path` defaults to `<sysconfdir>/apptainer/network`, beside
/// `apptainer.conf`, so that file is looked for next to `apptainer.network_dir`.
pub fn plugin_dirs(network_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(conf) = network_dir.parent().map(|d| d.join("apptainer.conf")) {
        if let Ok(text) = std::fs::read_to_string(conf) {
            dirs.extend(conf_value(&text, "cni plugin path").map(PathBuf::from));
        }
    }
    dirs.extend(DEFAULT_PLUGIN_DIRS.iter().map(PathBuf::from));
    dirs
}

/// `key = value` of apptainer.conf (`#` starts a comment line), the last one wins as in
/// Apptainer's parser.
fn conf_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .find(|v| !v.is_empty())
}

/// One plugin invocation of a DEL: what goes to its stdin, and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelStep {
    pub plugin: String,
    pub stdin: serde_json::Value,
}

/// Pure: the plugin calls of one network's DEL, from its conflist text, in libcni's order
/// (last plugin first). Each plugin gets its own object with the list's `name` and
/// `cniVersion` (libcni `buildOneConfig`); there is no cached result to pass as
/// `prevResult`.
#[cfg(test)]
fn del_steps(conflist: &str, path: &Path) -> Result<Vec<DelStep>, CniError> {
    let v: serde_json::Value = serde_json::from_str(conflist).map_err(|e| CniError::BadConf {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    steps_of(&v, path)
}

fn steps_of(v: &serde_json::Value, path: &Path) -> Result<Vec<DelStep>, CniError> {
    let bad = |reason: &str| CniError::BadConf {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let name = v.get("name").cloned().ok_or_else(|| bad("no \"name\""))?;
    let version = v
        .get("cniVersion")
        .cloned()
        .unwrap_or_else(|| "0.4.0".into());
    let plugins = v
        .get("plugins")
        .and_then(|p| p.as_array())
        .ok_or_else(|| bad("no \"plugins\" list"))?;
    let mut steps = Vec::new();
    for p in plugins.iter().rev() {
        let mut conf = p
            .as_object()
            .cloned()
            .ok_or_else(|| bad("a plugin is not an object"))?;
        let plugin = conf
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("a plugin has no \"type\""))?
            .to_owned();
        conf.insert("name".into(), name.clone());
        conf.insert("cniVersion".into(), version.clone());
        steps.push(DelStep {
            plugin,
            stdin: serde_json::Value::Object(conf),
        });
    }
    Ok(steps)
}

/// The configuration of network `name` in `dir`, found as Apptainer finds it: by its
/// `"name"` field, not its file name (pkg/network/network_linux.go `NewSetup` →
/// containernetworking/cni libcni/conf.go `LoadConfList`, v1.1.2:187-217 in Apptainer
/// 1.3.6, v1.2.3:262-293 in 1.4.5): the `*.conflist` files sorted by path, the first whose
/// name matches; else the `*.conf`/`*.json` files (`LoadConf`, v1.1.2:165-185,
/// v1.2.3:240-260), up-converted to a one-plugin list (`ConfListFromConf`, v1.1.2:248-270,
/// v1.2.3:324-346). A file that does not parse on the way stops the search with its error,
/// as in libcni. Returns the file and the configuration as a list.
pub fn find_conf(dir: &Path, name: &str) -> Result<(PathBuf, serde_json::Value), CniError> {
    let files = |exts: &[&str]| -> Result<Vec<PathBuf>, CniError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            // libcni ConfFiles: a missing directory has no files.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(CniError::ReadConf {
                    path: dir.to_owned(),
                    source,
                })
            }
        };
        let mut out: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| exts.contains(&x))
            })
            .collect();
        // Go's sort.Strings: byte order of the whole path.
        out.sort_by(|a, b| {
            a.as_os_str()
                .as_encoded_bytes()
                .cmp(b.as_os_str().as_encoded_bytes())
        });
        Ok(out)
    };
    let read = |p: &Path| -> Result<serde_json::Value, CniError> {
        let text = std::fs::read(p).map_err(|source| CniError::ReadConf {
            path: p.to_owned(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| CniError::BadConf {
            path: p.to_owned(),
            reason: e.to_string(),
        })
    };
    let named = |v: &serde_json::Value| v.get("name").and_then(|n| n.as_str()) == Some(name);
    for p in files(&["conflist"])? {
        let v = read(&p)?;
        if named(&v) {
            return Ok((p, v));
        }
    }
    for p in files(&["conf", "json"])? {
        let v = read(&p)?;
        if named(&v) {
            let list = serde_json::json!({
                "name": name,
                "cniVersion": v.get("cniVersion").cloned().unwrap_or_else(|| "".into()),
                "plugins": [v],
            });
            return Ok((p, list));
        }
    }
    Err(CniError::NotFound {
        network: name.to_owned(),
        dir: dir.to_owned(),
    })
}

/// Runs the DEL of every network of `s` for the container that had pid `container_pid`.
/// Returns one result per network, in order; it never stops at the first failure, so
/// that one broken network does not keep another's lease.
/// libcni's cache of ADD results (`CacheDir`, libcni/api.go:40 at v1.1.2 and :41 at v1.2.3,
/// the versions Apptainer 1.3.6 and 1.4.5 build with): `results/<network>-<container
/// id>-<ifname>` is written by each network's ADD and removed by its DEL (api.go:218-225 at
/// v1.1.2, :247-254 at v1.2.3).
const CNI_RESULTS: &str = "/var/lib/cni/results";

/// Whether the DEL of some network of the container that had pid `container_pid` has not
/// run: libcni's cached ADD result for it is still there. What tells that a master ran its
/// cleanup (see `run/watch.rs`, where a master's exit is judged).
pub fn del_pending(s: &Service, container_pid: i32) -> bool {
    del_pending_in(Path::new(CNI_RESULTS), s, container_pid)
}

fn del_pending_in(dir: &Path, s: &Service, container_pid: i32) -> bool {
    s.networks.iter().enumerate().any(|(i, n)| {
        dir.join(format!("{}-{container_pid}-eth{i}", n.name))
            .exists()
    })
}

pub async fn release(
    s: &Service,
    container_pid: i32,
    per_plugin: Duration,
) -> Vec<(String, Result<(), CniError>)> {
    let dirs = plugin_dirs(&s.apptainer.network_dir);
    let mut out = Vec::new();
    for (i, n) in s.networks.iter().enumerate() {
        let r = release_one(s, &n.name, i, container_pid, &dirs, per_plugin).await;
        out.push((n.name.clone(), r));
    }
    out
}

async fn release_one(
    s: &Service,
    network: &str,
    index: usize,
    container_pid: i32,
    dirs: &[PathBuf],
    per_plugin: Duration,
) -> Result<(), CniError> {
    let (path, conf) = find_conf(&s.apptainer.network_dir, network)?;
    for step in steps_of(&conf, &path)? {
        let Some(bin) = dirs
            .iter()
            .map(|d| d.join(&step.plugin))
            .find(|p| p.is_file())
        else {
            return Err(CniError::NoPlugin {
                network: network.to_owned(),
                plugin: step.plugin,
                dirs: dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            });
        };
        let cni_path: OsString = std::env::join_paths(dirs).unwrap_or_default();
        let run_err = |source| CniError::Run {
            network: network.to_owned(),
            plugin: step.plugin.clone(),
            source,
        };
        // pkg/invoke: the CNI_* variables and PATH only (Apptainer's SetEnvPath).
        let mut child = tokio::process::Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", "DEL")
            .env("CNI_CONTAINERID", container_pid.to_string())
            .env("CNI_NETNS", "")
            .env("CNI_IFNAME", format!("eth{index}"))
            .env("CNI_ARGS", "IgnoreUnknown=1")
            .env("CNI_PATH", &cni_path)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(run_err)?;
        let stdin = serde_json::to_vec(&step.stdin).expect("a JSON value serializes");
        if let Some(mut w) = child.stdin.take() {
            w.write_all(&stdin).await.map_err(run_err)?;
        }
        let output = match tokio::time::timeout(per_plugin, child.wait_with_output()).await {
            Ok(o) => o.map_err(run_err)?,
            Err(_) => {
                return Err(CniError::TimedOut {
                    network: network.to_owned(),
                    plugin: step.plugin,
                    secs: per_plugin.as_secs(),
                })
            }
        };
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            let err = String::from_utf8_lossy(&output.stderr);
            if !err.trim().is_empty() {
                text.push_str(&format!(" {}", err.trim()));
            }
            return Err(CniError::Failed {
                network: network.to_owned(),
                plugin: step.plugin,
                status: output.status.to_string(),
                output: text,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn del_runs_plugins_last_first_with_name_and_version() {
        let text = r#"{"cniVersion":"1.0.0","name":"ipmi_ww","plugins":[
            {"type":"bridge","bridge":"br0","ipam":{"type":"host-local"}},
            {"type":"tuning"}]}"#;
        let steps = del_steps(text, Path::new("/n/ipmi_ww.conflist")).unwrap();
        assert_eq!(
            steps.iter().map(|s| s.plugin.as_str()).collect::<Vec<_>>(),
            ["tuning", "bridge"]
        );
        assert_eq!(steps[1].stdin["name"], "ipmi_ww");
        assert_eq!(steps[1].stdin["cniVersion"], "1.0.0");
        assert_eq!(steps[1].stdin["ipam"]["type"], "host-local");
    }

    #[test]
    fn broken_conflist_names_the_file_and_problem() {
        let e = del_steps(r#"{"name":"x"}"#, Path::new("/n/x.conflist")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/n/x.conflist is not a CNI conflist: no \"plugins\" list"
        );
    }

    #[test]
    fn a_network_is_found_by_its_name_not_its_file_name() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let write = |f: &str, t: &str| std::fs::write(dir.join(f), t).unwrap();
        assert!(matches!(
            find_conf(&dir.join("missing"), "site"),
            Err(CniError::NotFound { .. })
        ));
        write(
            "00_bridge.conflist",
            r#"{"name":"bridge","cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
        );
        write(
            "10_site.conflist",
            r#"{"name":"site","cniVersion":"1.0.0","plugins":[{"type":"macvlan"}]}"#,
        );
        write(
            "20_site.conflist",
            r#"{"name":"site","cniVersion":"1.0.0","plugins":[{"type":"ipvlan"}]}"#,
        );
        write(
            "site.conflist",
            r#"{"name":"other","cniVersion":"1.0.0","plugins":[]}"#,
        );
        write(
            "05_single.conf",
            r#"{"name":"single","cniVersion":"0.4.0","type":"bridge"}"#,
        );
        write("04_single.conflist.bak", r#"{"name":"single"}"#);
        let (p, v) = find_conf(dir, "site").unwrap();
        assert_eq!(p, dir.join("10_site.conflist"), "the first in sorted order");
        assert_eq!(v["plugins"][0]["type"], "macvlan");
        let (p, _) = find_conf(dir, "bridge").unwrap();
        assert_eq!(p, dir.join("00_bridge.conflist"));
        // A single-plugin .conf is up-converted, as libcni's ConfListFromConf does.
        let (p, v) = find_conf(dir, "single").unwrap();
        assert_eq!(p, dir.join("05_single.conf"));
        let steps = steps_of(&v, &p).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].plugin, "bridge");
        assert_eq!(steps[0].stdin["name"], "single");
        assert_eq!(steps[0].stdin["cniVersion"], "0.4.0");
        assert!(matches!(
            find_conf(dir, "nowhere"),
            Err(CniError::NotFound { .. })
        ));
        // A broken file met on the way stops the search, as in libcni.
        write("01_broken.conflist", "{");
        assert!(matches!(
            find_conf(dir, "site"),
            Err(CniError::BadConf { .. })
        ));
    }

    #[test]
    fn plugin_path_from_apptainer_conf_first() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("apptainer.conf"),
            "# cni plugin path = /commented\ncni plugin path = /opt/apptainer/cni\n",
        )
        .unwrap();
        let dirs = plugin_dirs(&d.path().join("network"));
        assert_eq!(dirs[0], Path::new("/opt/apptainer/cni"));
        assert_eq!(dirs[1], Path::new("/usr/libexec/apptainer/cni"));
        let none = tempfile::tempdir().unwrap();
        assert_eq!(
            plugin_dirs(&none.path().join("network"))[0],
            Path::new("/usr/libexec/apptainer/cni")
        );
    }

    #[test]
    fn a_del_is_pending_while_libcnis_cached_add_result_is_there() {
        let s = crate::config::parse(
            "service_dir = \"/srv/x\"\n[[network]]\nname = \"a\"\nexternal = true\n[[network]]\nname = \"b\"\nexternal = true\n",
            Path::new("/etc/apptainer-supervisor/x.toml"),
            None,
        )
        .unwrap();
        let d = tempfile::tempdir().unwrap();
        assert!(
            !del_pending_in(d.path(), &s, 42),
            "no cached result: DEL done"
        );
        // The second network's ADD result, cached as libcni names it: <net>-<id>-<ifname>.
        std::fs::write(d.path().join("b-42-eth1"), "{}").unwrap();
        assert!(del_pending_in(d.path(), &s, 42));
        assert!(!del_pending_in(d.path(), &s, 43), "another container's");
    }
}
