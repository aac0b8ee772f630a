//! The `[[network]]` tables: start.sh's `--network` list (checked against host_vars'),
//! each with its `--network-args`, left external because neither input says what the
//! conflists hold; and the `bridge` network `--boot` alone gave the container.

use super::{merge_lists, Read};
use crate::migrate::{Level, Model, Net, Note, Setting};

/// Fills `m.networks`; needs `m.boot` settled (see the bridge below).
pub(super) fn networks(m: &mut Model, read: &Read) {
    let hv_nets = read.hv.as_ref().and_then(|h| h.networks.clone());
    let nets = merge_lists(
        read.sh.as_ref().map(|s| s.networks.clone()),
        hv_nets,
        "--network",
        "network",
    );
    m.networks = nets
        .into_iter()
        .map(|name| Net {
            name,
            args: Vec::new(),
        })
        .collect();
    if let Some(s) = &read.sh {
        for a in &s.network_args {
            network_args(m, a);
        }
    }
    if !m.networks.is_empty() {
        let all: Vec<String> = m.networks.iter().map(|n| n.name.value.clone()).collect();
        let first = &mut m.networks[0].name;
        let at = first.from.first().cloned().unwrap_or_default();
        first.notes.push(Note {
            level: Level::Note,
            at,
            text: format!(
                "the conflists of {} are Ansible's, and neither start.sh nor host_vars says what is \
                 in them: each network is left external (the supervisor only checks that \
                 a conflist in /etc/apptainer/network has that name). To let the \
                 supervisor write it, replace external = true with type, master, \
                 [network.ipam] … and manage = true (apptainer-supervisor.toml(5), NETWORKS; \
                 examples/*.toml)",
                all.join(", ")
            ),
        });
    }
    // `--boot` without `--network`: Apptainer gave the container its default `bridge`
    // network (launcher_linux.go: `--boot` sets Namespaces.Net, v1.4.5:365-367, and
    // setNamespaces then Network = "bridge", v1.4.5:959-962). The supervisor passes
    // `--network none` unless the service names that network, so it is written out.
    if m.networks.is_empty() && m.boot.value {
        let at = m.boot.from.first().cloned().unwrap_or_default();
        let mut name = Setting::new(crate::config::APPTAINER_BRIDGE.to_owned(), at.clone());
        name.from = m.boot.from.clone();
        name.notes.push(Note {
            level: Level::Note,
            at,
            text: "--boot without --network: Apptainer gave the container its default \
                   network, \"bridge\" (its 00_bridge.conflist: bridge sbr0, NAT, 10.22.0.0/16), \
                   so it is named here. Without a [[network]] the supervisor starts the \
                   container with --network none (no network); remove this table if the \
                   service needs none"
                .into(),
        });
        m.networks.push(Net {
            name,
            args: Vec::new(),
        });
    }
}

/// `--network-args "[net:]K=V;K2=V2"` → the args of that network, or of all of them
/// (Apptainer's pkg/network SetArgs: no prefix means every network).
fn network_args(m: &mut Model, a: &Setting<String>) {
    let (net, rest) = match a.value.split_once(':') {
        Some((n, r)) if !n.contains('=') => (Some(n.to_owned()), r.to_owned()),
        _ => (None, a.value.clone()),
    };
    let kvs: Vec<String> = rest
        .split(';')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let mut matched = false;
    for n in &mut m.networks {
        if net.as_deref().is_none_or(|x| x == n.name.value) {
            n.args.extend(kvs.iter().cloned());
            n.name.from.extend(a.from.iter().cloned());
            n.name.notes.extend(a.notes.iter().cloned());
            matched = true;
        }
    }
    if !matched {
        let mut s = a.clone();
        s.value = format!("--network-args={}", a.value);
        s.notes.push(Note {
            level: Level::Warning,
            at: a.from.first().cloned().unwrap_or_default(),
            text:
                "--network-args for a network start.sh does not join; kept in apptainer.extra_args"
                    .into(),
        });
        m.extra_args.push(s);
    }
}
