//! Test harness: a private world per test (service directory, Apptainer config dir, run
//! dir, a real `NOTIFY_SOCKET` datagram listener) and the Apptainer CLI double
//! (`tests/support/apptainer`, see DOUBLE.md) with the light init (`fake-init`).
#![allow(dead_code)]
pub mod host;
pub mod journal_native;
pub mod netns;
pub mod registry;
pub mod sif;

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_apptainer-supervisor");

/// One second: what the tests' bounds (never their assertions) are counted in.
pub const SEC: Duration = Duration::from_secs(1);

/// A finished process's stderr, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn support(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(file)
}

/// Tests that need root fail in CI (`CI=true`) and are skipped, loudly, elsewhere.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (namespaces, loop devices, cgroups) and CI=true: run as root");
    }
    eprintln!("SKIPPED: needs root");
    false
}

/// This process's capability bounding set (`CapBnd:` of `/proc/self/status`): what the
/// supervisor and the double started from here inherit.
pub fn own_bounding() -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd in /proc/self/status")
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// The capabilities of `mask` by name, in bit order (`CAP_CHOWN`, ...).
pub fn cap_names(mask: u64) -> Vec<String> {
    let mut all: Vec<caps::Capability> = caps::all().into_iter().collect();
    all.sort_by_key(|c| c.index());
    all.into_iter()
        .filter(|c| mask & c.bitmask() != 0)
        .map(|c| c.to_string())
        .collect()
}

/// Environment variables that point the Apptainer double at an apptainer.conf and a
/// capability.json (DOUBLE.md, "Capabilities").
pub const CONF_ENV: &str = "APPTAINER_CONFIG_FILE";
pub const CAPABILITY_FILE_ENV: &str = "APPTAINER_DOUBLE_CAPABILITY_FILE";

/// Writes `dir/apptainer.conf` with `root default capabilities = MODE` and
/// `dir/capability.json` giving root every capability of this machine's bounding set
/// (read now), as `apptainer capability add --user root ...` writes it (Go's
/// MarshalIndent with tabs, pkg/util/capabilities/config.go WriteTo). With `file`, a start
/// then succeeds only when nothing between this test and Apptainer's starter (the
/// supervisor, a unit directive) shrank the bounding set: the starter refuses a request
/// beyond its permitted set. Returns the environment that makes the double read them.
pub fn write_apptainer_conf(dir: &Path, mode: &str) -> Vec<(&'static str, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    let conf = dir.join("apptainer.conf");
    std::fs::write(
        &conf,
        format!(
            "# Test apptainer.conf (tests/support/mod.rs)\nroot default capabilities = {mode}\n"
        ),
    )
    .unwrap();
    let doc = serde_json::json!({"users": {"root": cap_names(own_bounding())}});
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(&doc, &mut ser).unwrap();
    let cap_file = dir.join("capability.json");
    std::fs::write(&cap_file, out).unwrap();
    vec![(CONF_ENV, conf), (CAPABILITY_FILE_ENV, cap_file)]
}

/// `Environment=` lines of a unit drop-in for [`write_apptainer_conf`]'s variables.
pub fn dropin_environment(env: &[(&'static str, PathBuf)]) -> String {
    env.iter()
        .map(|(k, v)| format!("Environment={k}={}\n", v.display()))
        .collect()
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub config_dir: PathBuf,
    pub run_dir: PathBuf,
    pub apptainer_dir: PathBuf,
    pub service_dir: PathBuf,
    /// Every datagram that arrived on NOTIFY_SOCKET, in order; a thread reads the socket
    /// all the time, as systemd does, so the sender never finds a full queue.
    notify: Arc<(Mutex<VecDeque<String>>, Condvar)>,
    notify_sock: UnixDatagram,
    pub notify_path: PathBuf,
    pub mark: PathBuf,
    pub env_dump: PathBuf,
    /// Run the supervisor and the double inside this network namespace (`/run/netns/NAME`,
    /// see `netns.rs`), so CNI plugins only touch the test's own interfaces.
    pub netns: Option<PathBuf>,
    /// A command prefix for what the world runs (e.g. `unshare -m ...`), inside `netns`.
    pub wrap: Vec<std::ffi::OsString>,
    /// Run the supervisor in a private mount namespace where this directory is bind-mounted
    /// on `/run/systemd/journal` (its `socket` is the test's journald; see tests/journal.rs).
    pub journal_dir: Option<PathBuf>,
    /// Extra environment for the supervisor (and so for the double and the init).
    pub env: Vec<(String, String)>,
    /// The light init (`fake-init` on the host's root) rather than a real systemd booted
    /// from the test rootfs.
    pub light_init: bool,
    /// The double's apptainer.conf and capability.json (`file`: every capability of this
    /// machine's bounding set), see [`write_apptainer_conf`]. `env` may override them.
    pub apptainer_conf: Vec<(&'static str, PathBuf)>,
    /// The container pid of the last state file read at drop, for cgroup cleanup.
    container_pid_seen: Option<i32>,
    children: Vec<Child>,
    /// The host name the world's commands see (set by [`World::as_host`]); Apptainer's
    /// state file path has it.
    pub hostname: Option<String>,
}

impl World {
    /// A world for service `name` with the usual layout and a minimal service file.
    pub fn new(name: &str) -> World {
        let dir = tempfile::Builder::new()
            .prefix("asv-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_owned();
        let service_dir = root.join("services").join(name);
        for d in ["bin", "containers", "overlay", "root"] {
            std::fs::create_dir_all(service_dir.join(d)).unwrap();
        }
        // The light init runs on the host's root, so the image is only checked, never booted:
        // an empty sandbox directory is a valid image (DOUBLE.md, "Init modes").
        std::fs::create_dir_all(service_dir.join("containers/sandbox")).unwrap();
        let config_dir = root.join("etc");
        std::fs::create_dir_all(&config_dir).unwrap();
        let notify_path = root.join("notify.sock");
        let notify_sock = UnixDatagram::bind(&notify_path).unwrap();
        let notify: Arc<(Mutex<VecDeque<String>>, Condvar)> = Arc::default();
        {
            let sock = notify_sock.try_clone().unwrap();
            let queue = notify.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // Ends when World shuts the socket down.
                while let Ok(n) = sock.recv(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let (q, cv) = &*queue;
                    q.lock()
                        .unwrap()
                        .push_back(String::from_utf8_lossy(&buf[..n]).into_owned());
                    cv.notify_all();
                }
            });
        }

        let w = World {
            name: name.to_owned(),
            config_dir,
            run_dir: root.join("run"),
            apptainer_dir: root.join("apptainer"),
            service_dir,
            notify,
            notify_sock,
            notify_path,
            mark: root.join("init.mark"),
            env_dump: root.join("init.env"),
            env: Vec::new(),
            light_init: true,
            netns: None,
            wrap: Vec::new(),
            journal_dir: None,
            apptainer_conf: write_apptainer_conf(&root.join("apptainer-etc"), "file"),
            container_pid_seen: None,
            children: Vec::new(),
            hostname: None,
            dir,
        };
        w.write_config("");
        w
    }

    /// A world whose container boots the real systemd of the test rootfs
    /// (`build-rootfs.sh`), with `readiness` TOML for the service.
    pub fn booted(name: &str, readiness: &str) -> World {
        let mut w = World::new(name);
        w.light_init = false;
        let rootfs = rootfs();
        let cfg = std::fs::read_to_string(w.config_path()).unwrap();
        let cfg = cfg
            .replace(
                "image = \"${service_dir}/containers/sandbox\"",
                &format!("image = \"{}\"", rootfs.display()),
            )
            .replace(
                "[readiness]\nmode = \"instance\"\n",
                &format!("[readiness]\n{readiness}\n"),
            )
            .replace("size_mib = 64", "size_mib = 256");
        std::fs::write(w.config_path(), cfg).unwrap();
        w
    }

    /// Makes the world a simulated core host: what it runs (the supervisor, the double)
    /// runs in mount and UTS namespaces of its own, with host name `name` and
    /// `/proc/sys/kernel/random/boot_id` reading `boot_id` (issue 16). File locks are the
    /// kernel's, so two such hosts see each other's locks, as hosts do over NFS.
    pub fn as_host(&mut self, name: &str, boot_id: &str) {
        let file = self.root().join("boot_id");
        std::fs::write(&file, format!("{boot_id}\n")).unwrap();
        let script = r#"set -e
hostname "$1"
mount --bind "$2" /proc/sys/kernel/random/boot_id
shift 2
exec "$@""#;
        self.wrap = [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            name,
        ]
        .iter()
        .map(Into::into)
        .collect();
        self.wrap.push(file.into());
        self.hostname = Some(name.to_owned());
    }

    /// Runs a command inside the container (its namespaces), as `apptainer exec` would.
    pub fn inside(&self, args: &[&str]) -> Output {
        let (pid, _) = self.instance_pids();
        Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-m",
                "-p",
                "-u",
                "-i",
                "-n",
                "-C",
                "--",
            ])
            .args(args)
            .output()
            .expect("nsenter")
    }

    /// A command for `program`, inside the world's network namespace when it has one.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if let Some((first, rest)) = self.wrap.split_first() {
            let mut c = match &self.netns {
                Some(ns) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net={}", ns.display()))
                        .arg("--")
                        .arg(first);
                    c
                }
                None => Command::new(first),
            };
            c.args(rest).arg(program);
            return c;
        }
        if let Some(j) = &self.journal_dir {
            assert!(self.netns.is_none(), "journal_dir and netns do not combine");
            // A tmpfs over /run/systemd (or over /run where that is missing, so that nothing
            // is created on the host) gives a mount point for the test's socket directory.
            let script = r#"set -e
if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; else mount -t tmpfs tmpfs /run; fi
mkdir -p /run/systemd/journal
mount --bind "$0" /run/systemd/journal
exec "$@""#;
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "--", "sh", "-c", script])
                .arg(j)
                .arg(program);
            return c;
        }
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Where the double finds the conflists (APPTAINER_DOUBLE_CNI_CONF_DIR) and the service
    /// file's `apptainer.network_dir` points.
    pub fn network_dir(&self) -> PathBuf {
        self.root().join("network")
    }

    /// Writes Apptainer's shipped default network, `etc/network/00_bridge.conflist` (the same
    /// at v1.3.6 and v1.4.5: bridge `sbr0`, gateway, ipMasq, host-local 10.22.0.0/16, firewall,
    /// portmap), into the test conf dir: the network `--boot` gets without `--network`. The
    /// only change is host-local's `dataDir` = `leases`, so that no lease lands in
    /// `/var/lib/cni`. The bridge plugin makes `sbr0` and iptables rules in the network
    /// namespace it runs in: only ever use it in a world with `netns` set. Returns the file.
    pub fn write_apptainer_bridge(&self, leases: &Path) -> PathBuf {
        assert!(
            self.netns.is_some(),
            "the bridge plugin changes the namespace it runs in: give the world a TestNetns"
        );
        let text = format!(
            r#"{{
    "cniVersion": "1.0.0",
    "name": "bridge",
    "plugins": [
        {{
            "type": "bridge",
            "bridge": "sbr0",
            "isGateway": true,
            "ipMasq": true,
            "ipam": {{
                "type": "host-local",
                "subnet": "10.22.0.0/16",
                "routes": [
                    {{ "dst": "0.0.0.0/0" }}
                ],
                "dataDir": "{}"
            }}
        }},
        {{
            "type": "firewall"
        }},
        {{
            "type": "portmap",
            "capabilities": {{"portMappings": true}},
            "snat": true
        }}
    ]
}}
"#,
            leases.display()
        );
        std::fs::create_dir_all(self.network_dir()).unwrap();
        let file = self.network_dir().join("00_bridge.conflist");
        std::fs::write(&file, text).unwrap();
        file
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.config_dir.join(format!("{}.toml", self.name))
    }

    /// Writes the service file: the base settings plus `extra` TOML (top-level keys first).
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "{extra}\nname = \"{}\"\nservice_dir = \"{}\"\nimage = \"${{service_dir}}/containers/sandbox\"\nbinds = [\"${{service_dir}}/root:/srv/root\"]\n\
             [apptainer]\nbinary = \"{}\"\nnetwork_dir = \"{}\"\n[overlay]\nsize_mib = 64\n[timeouts]\nstop_sec = 10\nkill_sec = 3\nstart_sec = 30\n\
             [readiness]\nmode = \"instance\"\n",
            self.name,
            self.service_dir.display(),
            support("apptainer").display(),
            self.network_dir().display(),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Appends TOML tables (e.g. `[[network]]`) at the end of the service file.
    pub fn append_config(&self, tables: &str) {
        let mut text = std::fs::read_to_string(self.config_path()).unwrap();
        text.push('\n');
        text.push_str(tables);
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn image(&self) -> PathBuf {
        self.service_dir.join("containers/sandbox")
    }

    pub fn overlay(&self) -> PathBuf {
        self.service_dir.join("overlay/overlay.img")
    }

    pub fn state_file(&self) -> PathBuf {
        let host = self
            .hostname
            .clone()
            .unwrap_or_else(|| nix::unistd::gethostname().unwrap().into_string().unwrap());
        self.apptainer_dir
            .join("instances/app")
            .join(host)
            .join("root")
            .join(&self.name)
            .join(format!("{}.json", self.name))
    }

    pub fn run_record(&self) -> PathBuf {
        self.run_dir.join(format!("{}.run", self.name))
    }

    fn base_env(&self, cmd: &mut Command) {
        cmd.env("APPTAINER_CONFIGDIR", &self.apptainer_dir)
            .env("APPTAINER_DOUBLE_CNI_CONF_DIR", self.network_dir());
        if self.light_init {
            cmd.env("APPTAINER_DOUBLE_INIT", support("fake-init"));
        } else {
            cmd.env_remove("APPTAINER_DOUBLE_INIT");
        }
        cmd.env("FAKE_INIT_MARK", &self.mark)
            .env("FAKE_INIT_ENV_DUMP", &self.env_dump)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID");
        for (k, v) in &self.apptainer_conf {
            cmd.env(k, v);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
    }

    /// `apptainer-supervisor run NAME` as systemd would start it (NOTIFY_SOCKET set).
    pub fn spawn_run(&mut self) -> u32 {
        let mut cmd = self.cmd(BIN);
        cmd.arg("--config-dir")
            .arg(&self.config_dir)
            .arg("run")
            .arg(&self.name)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.base_env(&mut cmd);
        cmd.env("NOTIFY_SOCKET", &self.notify_path);
        let child = cmd.spawn().expect("spawn supervisor");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// The supervisor child spawned `i`-th.
    pub fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i]
    }

    /// Waits for child `i` to exit (bounded) and returns its output.
    pub fn wait(&mut self, i: usize, within: Duration) -> Output {
        let deadline = Instant::now() + within;
        let child = &mut self.children[i];
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stdout = Vec::new();
                let mut stderr = Vec::new();
                child.stdout.take().map(|mut s| s.read_to_end(&mut stdout));
                child.stderr.take().map(|mut s| s.read_to_end(&mut stderr));
                return Output {
                    status,
                    stdout,
                    stderr,
                };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let mut stderr = Vec::new();
                child.stderr.take().map(|mut s| s.read_to_end(&mut stderr));
                panic!(
                    "supervisor {} did not exit within {within:?}; stderr:\n{}",
                    child.id(),
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a supervisor and waits for its READY=1. Returns the instance's (container,
    /// master) pids, both alive at READY, the container's init PID 1 of its own namespace.
    pub fn start(&mut self) -> (i32, i32) {
        self.spawn_run();
        let msgs = self.wait_ready();
        // READY=1 comes only once the instance is up: its state file names a live container
        // init (PID 1 of its own namespace) and a live master.
        let (pid, ppid) = self.instance_pids();
        assert!(
            alive(pid) && alive(ppid),
            "instance not alive at READY: {msgs:?}"
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert!(
            nspid.ends_with("\t1"),
            "container init is PID 1 inside: {nspid}"
        );
        (pid, ppid)
    }

    /// SIGTERM to supervisor `i`; its output once it has exited.
    pub fn stop(&mut self, i: usize) -> Output {
        kill(self.child(i).id() as i32, libc::SIGTERM);
        self.wait(i, 60 * SEC)
    }

    /// [`World::stop`], which must end with exit 0.
    pub fn stop_ok(&mut self, i: usize) -> Output {
        let out = self.stop(i);
        assert!(out.status.success(), "{}", stderr(&out));
        out
    }

    /// Runs the supervisor binary to completion with `args`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.cmd(BIN);
        cmd.arg("--config-dir")
            .arg(&self.config_dir)
            .args(args)
            .stdin(Stdio::null());
        self.base_env(&mut cmd);
        cmd.output().expect("run supervisor")
    }

    /// Runs the Apptainer double directly, as an operator would.
    pub fn apptainer(&self, args: &[&str]) -> Output {
        let mut cmd = self.cmd(support("apptainer"));
        cmd.args(args).stdin(Stdio::null());
        self.base_env(&mut cmd);
        cmd.output().expect("run apptainer double")
    }

    /// The next notify message, waiting at most until `deadline`.
    fn next_notify(&self, deadline: Instant) -> Option<String> {
        let (q, cv) = &*self.notify;
        let mut q = q.lock().unwrap();
        loop {
            if let Some(m) = q.pop_front() {
                return Some(m);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            q = cv.wait_timeout(q, deadline - now).unwrap().0;
        }
    }

    /// Reads notify messages until one satisfies `pred`; returns all read so far.
    pub fn notify_until(&self, within: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while let Some(msg) = self.next_notify(deadline) {
            let done = pred(&msg);
            got.push(msg);
            if done {
                return got;
            }
        }
        panic!("no matching notify message within {within:?}; got {got:?}");
    }

    /// Every message that arrives within `d`.
    pub fn notify_for(&self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut got = Vec::new();
        while let Some(m) = self.next_notify(deadline) {
            got.push(m);
        }
        got
    }

    /// Everything received and not read yet.
    pub fn notify_drain(&self) -> Vec<String> {
        self.notify.0.lock().unwrap().drain(..).collect()
    }

    /// Waits until the supervisor's live state file shows a watchdog ping sent after
    /// `since` that went unanswered. Pings go one at a time, so every earlier one was
    /// settled by then and its WATCHDOG=1, if it got one, has been sent.
    pub fn wait_unanswered_ping_after(&self, since: std::time::SystemTime) {
        let since_ms = since
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let live = self.run_dir.join(format!("{}.json", self.name));
        eventually(
            10 * SEC,
            "a ping sent after the stop went unanswered",
            || {
                std::fs::read(&live)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["last_unanswered_ping_ms"].as_u64())
                    .is_some_and(|ms| ms > since_ms)
            },
        );
    }

    /// Waits for READY=1 from the newest supervisor; fails at once, with its stderr, when
    /// that supervisor exits first.
    pub fn wait_ready(&mut self) -> Vec<String> {
        self.wait_ready_within(Duration::from_secs(30))
    }

    /// [`Self::wait_ready`] with a bound of `within`.
    pub fn wait_ready_within(&mut self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let last = self.children.len() - 1;
        while Instant::now() < deadline {
            match self.next_notify(Instant::now() + Duration::from_millis(100)) {
                Some(msg) => {
                    let ready = msg.lines().any(|l| l == "READY=1");
                    got.push(msg);
                    if ready {
                        return got;
                    }
                }
                None => {
                    if self.children[last].try_wait().unwrap().is_some() {
                        let out = self.wait(last, Duration::from_secs(1));
                        panic!(
                            "supervisor exited ({}) before READY=1; notify {got:?}; stderr:\n{}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                }
            }
        }
        panic!("no READY=1 within {within:?}; got {got:?}");
    }

    /// The instance's state file as Apptainer wrote it (pid, ppid).
    pub fn instance_pids(&self) -> (i32, i32) {
        let text = std::fs::read_to_string(self.state_file()).expect("state file");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (
            v["pid"].as_i64().unwrap() as i32,
            v["ppid"].as_i64().unwrap() as i32,
        )
    }

    pub fn mark_text(&self) -> String {
        std::fs::read_to_string(&self.mark).unwrap_or_default()
    }
}

/// The cached test rootfs (Debian + systemd + dbus + test units), built on first use.
/// `.ci/run` builds it before the tests; without it these tests fail, never skip.
pub fn rootfs() -> PathBuf {
    static ROOTFS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let out = Command::new(support("build-rootfs.sh"))
                .output()
                .expect("build-rootfs.sh");
            assert!(
                out.status.success(),
                "tests/support/build-rootfs.sh failed (needs debootstrap and the apt mirror):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

pub fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| !s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with plain integers.
    unsafe { libc::kill(pid, sig) };
}

/// Waits (bounded) until `f` holds.
pub fn eventually(within: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {within:?} waiting for: {what}");
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Loop devices backed by `image` (`losetup -j`).
pub fn loops_for(image: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .arg("-j")
        .arg(image)
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').next().map(str::to_owned))
        .collect()
}

impl Drop for World {
    /// Leaves nothing behind even when a test fails half-way: supervisors, the instance
    /// (container and master), loop devices.
    fn drop(&mut self) {
        let _ = self.notify_sock.shutdown(std::net::Shutdown::Both);
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut killed = Vec::new();
        if let Ok(text) = std::fs::read_to_string(self.state_file()) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                for k in ["pid", "ppid"] {
                    if let Some(p) = v[k].as_i64() {
                        kill(p as i32, libc::SIGKILL);
                        killed.push(p as i32);
                    }
                }
                self.container_pid_seen = v["pid"].as_i64().map(|p| p as i32);
            }
        }
        // Until the SIGKILLed pids are gone (bounded, never panicking in a drop).
        let deadline = Instant::now() + 5 * SEC;
        while killed.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A master killed here never ran its cleanup: remove the container's cgroup
        // (DOUBLE.md: /apptainer/<pid> in the cgroup2 hierarchy), deepest first.
        if let Some(pid) = self.container_pid_seen {
            for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                let dir = Path::new(root).join("apptainer").join(pid.to_string());
                if dir.is_dir() {
                    remove_cgroup_tree(&dir);
                }
            }
        }
        for dev in loops_for(&self.overlay()) {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}

/// Every connection waiting on `listener`: (the connecting process's pid, the bytes it
/// sent before it closed), read without blocking (`listener` must be non-blocking).
pub fn accepted(listener: &std::os::unix::net::UnixListener) -> Vec<(i32, Vec<u8>)> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut got = Vec::new();
    while let Ok((mut s, _)) = listener.accept() {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes of a ucred; the fd is open.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "SO_PEERCRED");
        s.set_nonblocking(true).unwrap();
        let mut bytes = Vec::new();
        let _ = s.read_to_end(&mut bytes);
        got.push((cred.pid, bytes));
    }
    got
}

/// Files directly in `dir` (names), sorted: what a test compares before and after.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
