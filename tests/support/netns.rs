//! A private network namespace per test, so that CNI plugins run by the Apptainer double
//! (`--network`, DOUBLE.md "Networking") only ever touch interfaces the test created.
//!
//! `TestNetns::new` makes `asv-nt<test pid>-<n>` (`ip netns add`), brings `lo` up and adds a
//! veth pair `p0` / `p0p` (both up) to serve as the macvlan parent: this kernel has no
//! `dummy`/`ipvlan`/`vlan` links, and macvlan in bridge mode on a veth works between
//! namespaces. Run the supervisor (and so the double, its master and the plugins) inside it
//! with [`TestNetns::command`] or [`TestNetns::wrap`]. Drop SIGKILLs whatever still runs in
//! the namespace and deletes it, which destroys every link in it (the veth pair, bridges and
//! host-side veths a CNI plugin made there).
//!
//! Entering uses `nsenter --net=/run/netns/NAME`, not `ip netns exec NAME`: the latter also
//! unshares the mount namespace and remounts `/sys`, which hides every cgroup mount
//! (`/sys/fs/cgroup/...`) from the supervisor and the double. Only the network namespace
//! changes here; mounts, cgroups and `/sys` stay the host's.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The macvlan parent created in every test namespace, and its veth peer.
pub const PARENT: &str = "p0";
pub const PARENT_PEER: &str = "p0p";

const PREFIX: &str = "asv-nt";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct TestNetns {
    name: String,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip(8)")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces that earlier, killed test processes left behind: only names of this
/// module's own form (`asv-nt<pid>-<n>`) whose process is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), true) = (pid.parse::<u32>(), n.chars().all(|c| c.is_ascii_digit())) else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            kill_all_in(&name);
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// SIGKILLs every process whose network namespace is `name` (`ip netns pids`).
fn kill_all_in(name: &str) {
    for _ in 0..3 {
        let out = ip(&["netns", "pids", name]);
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl TestNetns {
    /// Creates the namespace: `lo` up, veth `p0` <-> `p0p`, both up.
    pub fn new() -> TestNetns {
        sweep_stale();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        ip_ok(&["netns", "add", &name]);
        let ns = TestNetns { name };
        ns.ip_ok(&["link", "set", "lo", "up"]);
        ns.add_veth(PARENT, PARENT_PEER);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the namespace's bind mount.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Adds a veth pair `a` <-> `b` in the namespace, both up (another macvlan parent).
    pub fn add_veth(&self, a: &str, b: &str) {
        self.ip_ok(&["link", "add", a, "type", "veth", "peer", "name", b]);
        self.ip_ok(&["link", "set", a, "up"]);
        self.ip_ok(&["link", "set", b, "up"]);
    }

    /// `ip -n NAME <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `ip -n NAME <args>`, panicking on failure.
    pub fn ip_ok(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip_ok(&all)
    }

    /// Whether the namespace has a link called `link`.
    pub fn has_link(&self, link: &str) -> bool {
        self.ip(&["link", "show", "dev", link]).status.success()
    }

    /// The namespace's link names (`ip -o link`), e.g. `["lo", "p0p", "p0"]`.
    pub fn links(&self) -> Vec<String> {
        let out = self.ip(&["-o", "link", "show"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect()
    }

    /// A command running `program` inside the namespace (`nsenter --net=... -- program`).
    /// Add arguments, environment and stdio to it as to any `Command`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// The same command as `cmd` (program, arguments, environment changes, working
    /// directory), run inside the namespace. Stdio settings are not carried over: set them
    /// on the result.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut out = self.command(cmd.get_program());
        out.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => out.env(k, v),
                None => out.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            out.current_dir(dir);
        }
        out
    }

    /// Runs `args` inside the namespace to completion (stdin /dev/null).
    pub fn run(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("a program");
        self.command(program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .expect("run in test netns")
    }

    /// PIDs of the processes whose network namespace this is (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        let out = ip(&["netns", "pids", &self.name]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        TestNetns::new()
    }
}

impl Drop for TestNetns {
    /// SIGKILLs what still runs in the namespace, then deletes it (and with it every link
    /// in it). Containers have namespaces of their own and are not touched here: World's
    /// Drop (or the master's cleanup) ends them.
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
