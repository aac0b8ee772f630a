//! Validated service → the exact `apptainer` argv and environment. Pure: no I/O.
//!
//! One ordered table maps each key to its flag and how it is emitted, like Quadlet's key
//! tables, but as a slice so the argv order is stable and tests compare whole vectors.
//! The result is passed to `execve` as a vector; no shell ever sees it.

use std::ffi::OsString;

use crate::config::keys;
use crate::config::{Service, NO_NETWORK};

/// How a table entry turns into arguments.
enum Emit {
    /// `--flag` when true.
    Bool(fn(&Service) -> bool),
    /// `--flag VALUE` when set.
    Single(fn(&Service) -> Option<String>),
    /// `--flag V` once per value.
    Repeated(fn(&Service) -> Vec<String>),
    /// `--flag a,b,c` once, when non-empty.
    Joined(fn(&Service) -> Vec<String>, &'static str),
}

struct Entry {
    /// The config key it comes from (for `check --json` and the man page).
    key: &'static str,
    flag: &'static str,
    emit: Emit,
}

/// In the order start.sh wrote them: `--boot --network … -B … --overlay …`.
const TABLE: &[Entry] = &[
    Entry {
        key: keys::BOOT,
        flag: "--boot",
        emit: Emit::Bool(|s| s.boot),
    },
    Entry {
        key: keys::HOSTNAME,
        flag: "--hostname",
        emit: Emit::Single(|s| s.hostname.clone()),
    },
    Entry {
        key: keys::NETWORK_NAME,
        flag: "--network",
        emit: Emit::Joined(networks, ","),
    },
    Entry {
        key: keys::NETWORK_ARGS,
        flag: "--network-args",
        emit: Emit::Repeated(network_args),
    },
    Entry {
        key: keys::BINDS,
        flag: "--bind",
        emit: Emit::Repeated(|s| s.binds.iter().map(|b| b.spec()).collect()),
    },
    Entry {
        key: keys::OVERLAY_PATH,
        flag: "--overlay",
        emit: Emit::Single(|s| Some(s.overlay.path.display().to_string())),
    },
];

/// The `--network` list: the service's networks, or `none` when it has none and Apptainer
/// would otherwise make a network namespace. `--boot` (and `--net`) turn the network
/// namespace on, and Apptainer then picks its default `bridge` network when no `--network`
/// is given (internal/pkg/runtime/launch/launcher_linux.go: the `l.cfg.Boot` block sets
/// `Namespaces.Net`, v1.3.6:367-369, v1.4.5:365-367; `setNamespaces` sets `Network =
/// "bridge"`, v1.3.6:946-949, v1.4.5:959-962): a CNI lease on sbr0 that nobody asked for
/// and nobody releases after a master dies. `none` gives an empty namespace instead
/// (container_linux.go `prepareNetworkSetup`: no CNI for `none`, v1.3.6:2693, v1.4.5:2742).
/// A service that wants that bridge names it: `[[network]] name = "bridge"`, `external =
/// true`. Without `--boot` or `--net` there is no network namespace and nothing is added:
/// `--network none` would create one (`setNamespaces`) and cut the host network off.
fn networks(s: &Service) -> Vec<String> {
    if !s.networks.is_empty() {
        return s.networks.iter().map(|n| n.name.clone()).collect();
    }
    let net_flag = s
        .apptainer
        .extra_args
        .iter()
        .any(|a| a == "--net" || a == "-n");
    if s.boot || net_flag {
        vec![NO_NETWORK.to_owned()]
    } else {
        Vec::new()
    }
}

/// One `--network-args "net:K=V;K2=V2"` per network that has arguments. Apptainer's
/// `SetArgs` (pkg/network) gives every `;`-separated key to the network named before the
/// `:`, so two networks' arguments in one value would all land on the first.
fn network_args(s: &Service) -> Vec<String> {
    s.networks
        .iter()
        .filter(|n| !n.args.is_empty())
        .map(|n| format!("{}:{}", n.name, n.args.join(";")))
        .collect()
}

/// `apptainer instance start [flags…] [extra_args…] IMAGE NAME` — argv[0] included.
pub fn instance_start(s: &Service) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        s.apptainer.binary.clone().into(),
        "instance".into(),
        "start".into(),
    ];
    for e in TABLE {
        match &e.emit {
            Emit::Bool(f) => {
                if f(s) {
                    argv.push(e.flag.into());
                }
            }
            Emit::Single(f) => {
                if let Some(v) = f(s) {
                    argv.push(e.flag.into());
                    argv.push(v.into());
                }
            }
            Emit::Repeated(f) => {
                for v in f(s) {
                    argv.push(e.flag.into());
                    argv.push(v.into());
                }
            }
            Emit::Joined(f, sep) => {
                let vs = f(s);
                if !vs.is_empty() {
                    argv.push(e.flag.into());
                    argv.push(vs.join(sep).into());
                }
            }
        }
    }
    argv.extend(s.apptainer.extra_args.iter().map(OsString::from));
    argv.push(s.image.clone().into());
    argv.push(s.name.clone().into());
    argv
}

/// `apptainer overlay create [-S] -s MIB PATH` — how the seed's Ansible role made it.
pub fn overlay_create(s: &Service, path: &std::path::Path) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        s.apptainer.binary.clone().into(),
        "overlay".into(),
        "create".into(),
    ];
    if s.overlay.sparse {
        argv.push("-S".into());
    }
    argv.push("-s".into());
    argv.push(s.overlay.size_mib.to_string().into());
    argv.push(path.into());
    argv
}

/// `apptainer instance stop -F NAME`: the escalation after an orderly halt timed out.
pub fn instance_stop_force(s: &Service) -> Vec<OsString> {
    vec![
        s.apptainer.binary.clone().into(),
        "instance".into(),
        "stop".into(),
        "-F".into(),
        s.name.clone().into(),
    ]
}

/// Which config key produced each flag (for `check --json`).
pub fn flag_keys() -> impl Iterator<Item = (&'static str, &'static str)> {
    TABLE.iter().map(|e| (e.flag, e.key))
}

/// Variables that belong to our own systemd unit and must not reach the container's init:
/// Apptainer passes the host environment through (internal/pkg/util/env/create.go), and an
/// inner systemd that finds `NOTIFY_SOCKET` would try to talk to the host's manager.
pub const SCRUBBED_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "RUNTIME_DIRECTORY",
    "MAINPID",
    "MANAGERPID",
    "SYSTEMD_EXEC_PID",
    "TRIGGER_UNIT",
];

/// The child's environment: ours minus [`SCRUBBED_ENV`], then the env file, then `env`
/// (later wins, as `source .service_env` followed by explicit settings would).
pub fn child_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    env_file: &[(String, String)],
    s: &Service,
) -> Vec<(OsString, OsString)> {
    let mut out: Vec<(OsString, OsString)> = parent
        .into_iter()
        .filter(|(k, _)| !SCRUBBED_ENV.iter().any(|s| k == s))
        .collect();
    let mut set = |k: &str, v: &str| {
        out.retain(|(ok, _)| ok != k);
        out.push((k.into(), v.into()));
    };
    // systemd's container interface (CONTAINER_INTERFACE.md): PID 1 learns it runs in a
    // container from `$container`. Apptainer sets none and passes our environment to the
    // --boot init, so we set it; without it systemd-shutdown may freeze after reboot()
    // fails for want of CAP_SYS_BOOT instead of exiting. The env file or [env] may override.
    set("container", "apptainer");
    for (k, v) in env_file {
        set(k, v);
    }
    for (k, v) in &s.env {
        set(k, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::path::Path;

    fn svc(text: &str) -> Service {
        parse(text, Path::new("/etc/apptainer-supervisor/x.toml"), None).unwrap()
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    /// Each case: service file → the whole argv.
    const CASES: &[(&str, &str, &[&str])] = &[
        (
            "minimal",
            "name = \"x\"\nservice_dir = \"/srv/x\"\n",
            &[
                "/usr/bin/apptainer",
                "instance",
                "start",
                "--boot",
                "--network",
                "none",
                "--overlay",
                "/srv/x/overlay/overlay.img",
                "/srv/x/containers/container.sif",
                "x",
            ],
        ),
        (
            "Apptainer's default bridge, asked for",
            "name = \"x\"\nservice_dir = \"/srv/x\"\n[[network]]\nname = \"bridge\"\nexternal = true\n",
            &[
                "/usr/bin/apptainer",
                "instance",
                "start",
                "--boot",
                "--network",
                "bridge",
                "--overlay",
                "/srv/x/overlay/overlay.img",
                "/srv/x/containers/container.sif",
                "x",
            ],
        ),
        (
            "no boot, no network: the host's network, no namespace",
            "name = \"x\"\nservice_dir = \"/srv/x\"\nboot = false\n",
            &[
                "/usr/bin/apptainer",
                "instance",
                "start",
                "--overlay",
                "/srv/x/overlay/overlay.img",
                "/srv/x/containers/container.sif",
                "x",
            ],
        ),
        (
            "no boot but --net: a namespace, so none",
            "name = \"x\"\nservice_dir = \"/srv/x\"\nboot = false\n[apptainer]\nextra_args = [\"--net\"]\n",
            &[
                "/usr/bin/apptainer",
                "instance",
                "start",
                "--network",
                "none",
                "--overlay",
                "/srv/x/overlay/overlay.img",
                "--net",
                "/srv/x/containers/container.sif",
                "x",
            ],
        ),
        (
            "ood001 as start.sh had it",
            r#"name = "ood001"
service_dir = "/shared/services/ood/ood001"
binds = ["/home/systems/slurm/etc/slurm:/etc/slurm", "/shared", "/home", "/orcd", "${service_dir}/root:/root"]
[[network]]
name = "macvlan_ood001"
external = true
"#,
            &[
                "/usr/bin/apptainer",
                "instance",
                "start",
                "--boot",
                "--network",
                "macvlan_ood001",
                "--bind",
                "/home/systems/slurm/etc/slurm:/etc/slurm",
                "--bind",
                "/shared",
                "--bind",
                "/home",
                "--bind",
                "/orcd",
                "--bind",
                "/shared/services/ood/ood001/root:/root",
                "--overlay",
                "/shared/services/ood/ood001/overlay/overlay.img",
                "/shared/services/ood/ood001/containers/container.sif",
                "ood001",
            ],
        ),
        (
            "two networks with args, no boot, extra args, hostname",
            r#"name = "ww001"
service_dir = "/srv/ww001"
boot = false
hostname = "ww"
image = "/img/ww.sif"
binds = ["/a:/b:ro"]
[[network]]
name = "macvlan_ww001"
args = ["IP=10.0.0.2/24"]
external = true
[[network]]
name = "ipmi_bridge_ww001"
external = true
[overlay]
path = "overlay.img"
[apptainer]
binary = "/opt/apptainer/bin/apptainer"
extra_args = ["--writable-tmpfs"]
"#,
            &[
                "/opt/apptainer/bin/apptainer",
                "instance",
                "start",
                "--hostname",
                "ww",
                "--network",
                "macvlan_ww001,ipmi_bridge_ww001",
                "--network-args",
                "macvlan_ww001:IP=10.0.0.2/24",
                "--bind",
                "/a:/b:ro",
                "--overlay",
                "/srv/ww001/overlay.img",
                "--writable-tmpfs",
                "/img/ww.sif",
                "ww001",
            ],
        ),
    ];

    #[test]
    fn argv_table_cases() {
        for (what, text, want) in CASES {
            assert_eq!(strs(instance_start(&svc(text))), *want, "case: {what}");
        }
    }

    #[test]
    fn network_args_go_one_value_per_network() {
        let s = svc("service_dir = \"/s\"\n[[network]]\nname = \"a\"\nexternal = true\nargs = [\"IP=10.0.0.2/24\", \"X=1\"]\n[[network]]\nname = \"b\"\nexternal = true\n[[network]]\nname = \"c\"\nexternal = true\nargs = [\"MAC=02:00:00:00:00:01\"]\n");
        let argv = strs(instance_start(&s));
        let args: Vec<&str> = argv
            .windows(2)
            .filter(|w| w[0] == "--network-args")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(args, ["a:IP=10.0.0.2/24;X=1", "c:MAC=02:00:00:00:00:01"]);
    }

    #[test]
    fn overlay_create_matches_the_ansible_role() {
        let s = svc("service_dir = \"/s\"\n[overlay]\nsize_mib = 100000\n");
        assert_eq!(
            strs(overlay_create(&s, Path::new("/s/overlay/overlay.img"))),
            [
                "/usr/bin/apptainer",
                "overlay",
                "create",
                "-S",
                "-s",
                "100000",
                "/s/overlay/overlay.img"
            ]
        );
        let s = svc("service_dir = \"/s\"\n[overlay]\nsparse = false\n");
        assert_eq!(
            strs(overlay_create(&s, Path::new("/o"))),
            [
                "/usr/bin/apptainer",
                "overlay",
                "create",
                "-s",
                "1024",
                "/o"
            ]
        );
    }

    #[test]
    fn env_is_scrubbed_then_layered() {
        let s = svc("service_dir = \"/s\"\n[env]\nB = \"config\"\n");
        let parent = [
            ("PATH", "/bin"),
            ("NOTIFY_SOCKET", "/run/n"),
            ("WATCHDOG_USEC", "1"),
            ("B", "host"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(
            parent,
            &[("A".into(), "file".into()), ("B".into(), "file".into())],
            &s,
        );
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        assert_eq!(
            env,
            [
                ("PATH", "/bin"),
                ("container", "apptainer"),
                ("A", "file"),
                ("B", "config")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn every_flag_names_a_documented_key() {
        for (_, key) in flag_keys() {
            assert!(keys::ALL.contains(&key), "{key}");
        }
    }
}
