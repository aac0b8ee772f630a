//! Networks end to end: the supervisor writes the conflists, the Apptainer double runs the
//! real CNI plugins (Debian's containernetworking-plugins) with them, inside a network
//! namespace the test makes with a veth as the macvlan parent. No real interface is
//! touched; traffic stays inside the test's namespaces. Needs root.

mod support;

use std::path::Path;

use support::netns::TestNetns;
use support::*;

fn macvlan(name: &str, master: &str, addr: &str) -> String {
    format!(
        "[[network]]\nname = \"{name}\"\ntype = \"macvlan\"\nmaster = \"{master}\"\nmode = \"bridge\"\n\
         [network.ipam]\ntype = \"static\"\naddresses = [\"{addr}\"]\n"
    )
}

fn in_netns(name: &str, ns: &TestNetns) -> World {
    let mut w = World::new(name);
    w.netns = Some(ns.path());
    w
}

/// Addresses of `ifname` inside the container (`ip -o addr`).
fn addrs(w: &World, ifname: &str) -> String {
    let out = w.inside(&["ip", "-o", "-4", "addr", "show", "dev", ifname]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_services_on_macvlan_reach_each_other_by_their_static_addresses() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let mut a = in_netns("n-a", &ns);
    let mut b = in_netns("n-b", &ns);
    a.append_config(&macvlan("mv_a", "p0", "10.99.0.2/24"));
    b.append_config(&macvlan("mv_b", "p0", "10.99.0.3/24"));
    a.spawn_run();
    b.spawn_run();
    let ready_a = a.wait_ready();
    b.wait_ready();
    assert!(
        ready_a.last().unwrap().contains("; ip 10.99.0.2"),
        "the address is in READY's STATUS: {ready_a:?}"
    );
    // The conflist the supervisor wrote is what the plugins ran with.
    let conf = std::fs::read_to_string(a.network_dir().join("mv_a.conflist")).unwrap();
    assert!(
        conf.contains("\"master\": \"p0\"") && conf.contains("apptainerSupervisor"),
        "{conf}"
    );
    assert!(addrs(&a, "eth0").contains("10.99.0.2/24"));
    let ping = a.inside(&["ping", "-c", "1", "-W", "2", "10.99.0.3"]);
    assert!(
        ping.status.success(),
        "a reaches b: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let ping = b.inside(&["ping", "-c", "1", "-W", "2", "10.99.0.2"]);
    assert!(ping.status.success(), "b reaches a");
    a.stop_ok(0);
    b.stop_ok(0);
}

#[test]
fn two_networks_like_ww001_give_eth0_and_eth1() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let mut w = in_netns("n-ww", &ns);
    let leases = w.root().join("leases");
    w.append_config(&format!(
        "{}[[network]]\nname = \"ipmi_ww\"\ntype = \"bridge\"\nbridge = \"asvbr0\"\n\
         [network.ipam]\ntype = \"host-local\"\nsubnet = \"192.168.77.0/24\"\nrange_start = \"192.168.77.2\"\n\
         range_end = \"192.168.77.9\"\ndata_dir = \"{}\"\n",
        macvlan("mv_ww", "p0", "10.99.0.10/24"),
        leases.display()
    ));
    w.spawn_run();
    w.wait_ready();
    assert!(
        addrs(&w, "eth0").contains("10.99.0.10/24"),
        "{}",
        addrs(&w, "eth0")
    );
    assert!(
        addrs(&w, "eth1").contains("192.168.77.2/24"),
        "{}",
        addrs(&w, "eth1")
    );
    assert!(
        leases.join("ipmi_ww").join("192.168.77.2").exists(),
        "host-local lease taken"
    );
    let (_, master) = w.instance_pids();
    w.stop_ok(0);
    eventually(10 * SEC, "master gone (its cleanup runs CNI DEL)", || {
        !alive(master)
    });
    assert!(
        !leases.join("ipmi_ww").join("192.168.77.2").exists(),
        "lease released by DEL"
    );
}

#[test]
fn missing_parent_interface_is_a_clear_error() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let mut w = in_netns("n-noparent", &ns);
    w.append_config(&macvlan("mv_x", "p9", "10.99.0.4/24"));
    w.spawn_run();
    let out = w.wait(0, 20 * SEC);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("parent interface \"p9\" of network mv_x does not exist on this host"),
        "{err}"
    );
    assert!(!w.state_file().exists(), "nothing started");
}

#[test]
fn a_static_address_claimed_twice_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let svc = |name: &str| {
        format!(
            "name = \"{name}\"\nservice_dir = \"/nonexistent/{name}\"\n[apptainer]\nnetwork_dir = \"{}\"\n{}",
            d.path().join("net").display(),
            macvlan(&format!("mv_{name}"), "lo", "10.99.0.5/24")
        )
    };
    std::fs::write(d.path().join("one.toml"), svc("one")).unwrap();
    std::fs::write(d.path().join("two.toml"), svc("two")).unwrap();
    // A static fact of the config directory: plain check finds it too, not only --host.
    for extra in [&[][..], &["--host"][..]] {
        let out = std::process::Command::new(BIN)
            .args(["--config-dir", d.path().to_str().unwrap(), "check", "one"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{extra:?}: {err}");
        assert!(
            err.contains("10.99.0.5 of network mv_one is also claimed by service two (mv_two)"),
            "{extra:?}: {err}"
        );
    }
}

#[test]
fn conflist_is_rewritten_only_when_it_changes_and_a_foreign_one_never() {
    if !require_root() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let ns = TestNetns::new();
    let mut w = in_netns("n-keep", &ns);
    w.append_config(&macvlan("mv_keep", "p0", "10.99.0.6/24"));
    w.spawn_run();
    w.wait_ready();
    w.stop_ok(0);
    let file = w.network_dir().join("mv_keep.conflist");
    let before = std::fs::metadata(&file).unwrap();
    w.spawn_run();
    w.wait_ready();
    w.stop_ok(1);
    let after = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec()),
        "untouched when unchanged"
    );
    // A hand-written conflist of that name (as Ansible wrote them) is left alone.
    let hand = "{\"cniVersion\":\"1.0.0\",\"name\":\"mv_keep\",\"plugins\":[{\"type\":\"macvlan\",\"master\":\"p0\",\"ipam\":{\"type\":\"static\",\"addresses\":[{\"address\":\"10.99.0.6/24\"}]}}]}\n";
    std::fs::write(&file, hand).unwrap();
    w.spawn_run();
    let out = w.wait(2, 20 * SEC);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("not written by apptainer-supervisor, left untouched"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), hand);
}

/// Golden files: each shipped example renders exactly `tests/fixtures/conflists/NAME.conflist`
/// (its README says which values are placeholders).
#[test]
fn example_conflists_match_their_golden_files() {
    for example in ["ood001", "login005", "login007", "ood-ha001", "ww001"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{example}.toml"));
        let out = std::process::Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let conflists = plan["conflists"].as_object().unwrap();
        assert!(!conflists.is_empty(), "{example} has networks");
        for (name, got) in conflists {
            let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/fixtures/conflists/{name}.conflist"));
            let want: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&golden).unwrap()).unwrap();
            assert_eq!(
                got,
                &want,
                "{example}: {name} differs from {}",
                golden.display()
            );
        }
    }
}

/// The shipped examples' networks, with the placeholder parent `eth0` swapped for the test's
/// veth: the conflists the supervisor writes for them are accepted by the real plugins.
#[test]
fn example_networks_are_accepted_by_the_real_plugins() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    for example in ["ood001", "login005", "login007", "ood-ha001", "ww001"] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{example}.toml")),
        )
        .unwrap();
        let start = text.find("[[network]]").expect("the example has networks");
        let end = ["\n[overlay]", "\n[readiness]", "\n# start.sh: --overlay"]
            .iter()
            .filter_map(|t| text[start..].find(t).map(|i| start + i))
            .min()
            .unwrap_or(text.len());
        let networks = text[start..end].replace("master = \"eth0\"", "master = \"p0\"");
        let mut w = in_netns(&format!("x-{example}"), &ns);
        w.append_config(&networks);
        w.spawn_run();
        let msgs = w.wait_ready();
        let first = networks
            .split("addresses = [\"")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap()
            .to_owned();
        assert!(
            msgs.last().unwrap().contains(&format!("; ip {first}")),
            "{example}: {msgs:?}"
        );
        w.stop_ok(0);
    }
}

/// The `ip` Apptainer recorded in the instance's state file.
fn state_ip(w: &World) -> String {
    let text = std::fs::read_to_string(w.state_file()).expect("state file");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["ip"].as_str().unwrap_or_default().to_owned()
}

/// The double is no kinder than Apptainer: `--boot` turns the network namespace on and,
/// without `--network`, Apptainer runs its default `bridge` network (launcher_linux.go
/// `setNamespaces`), so a start.sh line without `--network` got a lease on sbr0.
#[test]
fn boot_without_network_gets_apptainers_bridge_under_the_double() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let w = in_netns("n-implied", &ns);
    let leases = w.root().join("leases");
    w.write_apptainer_bridge(&leases);
    let image = w.image();
    let out = w.apptainer(&[
        "instance",
        "start",
        "--boot",
        image.to_str().unwrap(),
        "n-implied",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ip = state_ip(&w);
    assert!(ip.starts_with("10.22."), "the bridge's address: {ip:?}");
    assert!(leases.join("bridge").join(&ip).exists(), "a lease is taken");
    assert!(addrs(&w, "eth0").contains(&format!("{ip}/16")));
    assert!(ns.has_link("sbr0"), "the bridge plugin made sbr0");
    let (_, master) = w.instance_pids();
    let stop = w.apptainer(&["instance", "stop", "n-implied"]);
    assert!(stop.status.success());
    eventually(10 * SEC, "master gone (its cleanup runs the DEL)", || {
        !alive(master)
    });
    assert!(!leases.join("bridge").join(&ip).exists(), "lease released");
}

/// A service without `[[network]]` runs with `--network none`: an empty namespace, no lease,
/// even where Apptainer's bridge conflist is installed. One that names `bridge` gets it, and
/// when its master is SIGKILLed the supervisor finds the conflist by its "name" (the file is
/// 00_bridge.conflist, as libcni's LoadConfList would) and releases the lease.
#[test]
fn no_network_means_none_and_the_bridge_only_when_named_and_released_after_a_dead_master() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let mut w = in_netns("n-none", &ns);
    std::fs::write(
        w.root().join("apptainer.conf"),
        "cni plugin path = /usr/lib/cni\n",
    )
    .unwrap();
    let leases = w.root().join("leases");
    w.write_apptainer_bridge(&leases);
    w.write_config("boot = true");
    let check = w.cli(&["check", "n-none"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("--network none"), "{text}");
    w.spawn_run();
    let ready = w.wait_ready();
    assert!(!ready.last().unwrap().contains("; ip "), "{ready:?}");
    assert_eq!(state_ip(&w), "");
    let links = w.inside(&["ip", "-o", "link"]);
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(!leases.join("bridge").exists(), "no lease taken");
    w.stop_ok(0);

    w.append_config("[[network]]\nname = \"bridge\"\nexternal = true\n");
    let check = w.cli(&["check", "--host", "n-none"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains("--network bridge"),
        "{text}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    w.spawn_run();
    let ready = w.wait_ready();
    let ip = state_ip(&w);
    assert!(ip.starts_with("10.22."), "{ip:?}");
    assert!(
        ready.last().unwrap().contains(&format!("; ip {ip}")),
        "{ready:?}"
    );
    let lease = leases.join("bridge").join(&ip);
    assert!(lease.exists());
    let (pid, master) = w.instance_pids();
    kill(master, libc::SIGKILL);
    let out = w.wait(1, 30 * SEC);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("released the network the dead master left"),
        "{err}"
    );
    assert!(!lease.exists(), "the DEL the master never ran was run");
    assert!(!alive(pid));
}
