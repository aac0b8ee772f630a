//! The container's own systemd, over the container's system bus.
//!
//! The bus socket is `/run/dbus/system_bus_socket` *inside* the container: it is resolved in
//! the container's root ([`super::in_root`]; never `/proc/<pid>/root/...`, which the kernel
//! would resolve through an absolute symlink against the host's root) and connected through
//! the O_PATH fd of the socket found there; then its peer (SO_PEERCRED) must live in the
//! container's PID namespace before a byte is sent. Not the private socket
//! `/run/systemd/private`: systemd refuses a peer whose PID it cannot see in its PID
//! namespace, and zbus rejects systemd's replies there (shared/reference,
//! real-systemd-in-namespaces.md).
//!
//! Two connections: one for calls, which has no signal stream, and one for signals, which has
//! exactly one stream (all of systemd's signals, one match rule) and is read all the time. A
//! zbus connection stops reading its socket while any of its signal queues (64 messages) is
//! full, so signals piling up behind a call on the same connection would leave the reply
//! unread for ever; calls on a connection without streams can never wait behind signals.
//! Every call is bounded by [`CALL_TIMEOUT`].
//!
//! We call `Subscribe()` and follow `JobNew`, `JobRemoved`, `StartupFinished` and the
//! `PropertiesChanged` of each required unit; nothing polls for state. Every string systemd
//! gives us is checked as it is read ([`super::sanitize`]: states as `enum_value`, unit
//! names as `unit_name`). A task owns the watch and hands [`InnerEvent`]s to the event loop
//! through [`InnerEvents`], bounded: the latest state, not a queue of them.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::stream::StreamExt;
use nix::sys::stat::SFlag;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use super::in_root::{open_in_root, InRootError};
use super::sanitize::{enum_value, one_line, unit_name};

mod events;
#[cfg(test)]
mod flood_tests;
mod verdict;

/// The states the inner modules' tests build.
#[cfg(test)]
mod fixtures {
    use super::{InnerState, UnitState};

    pub(super) fn unit(active: &str, sub: &str, result: &str) -> UnitState {
        UnitState {
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            result: result.into(),
        }
    }

    pub(super) fn state(system: &str, jobs: u32, units: &[(&str, UnitState)]) -> InnerState {
        InnerState {
            system_state: system.into(),
            jobs,
            units: units
                .iter()
                .map(|(n, u)| (n.to_string(), u.clone()))
                .collect(),
        }
    }
}
pub use events::{events, InnerEvents, InnerSender};
pub use verdict::verdict;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Only a unit that is loaded now (no side effect, unlike LoadUnit).
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    #[allow(clippy::type_complexity)]
    fn list_units_filtered(
        &self,
        states: &[&str],
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    #[zbus(property)]
    fn system_state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "NJobs")]
    fn n_jobs(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn finish_timestamp_monotonic(&self) -> zbus::Result<u64>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
}

/// The `Result` of a service unit lives on the `.Service` interface.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub trait ServiceUnit {
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
}

/// Where the container's system bus is, inside the container.
pub const BUS_PATH: &str = "/run/dbus/system_bus_socket";

/// Every D-Bus call to the container's systemd gets an answer within this or fails as
/// "no answer" (sd-bus's and libdbus's default method timeout, 25 s). During a run a call
/// that times out ends the watch as a lost bus, which the policy handles (watch the
/// instance only); a ping has its own, shorter bound.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(25);

/// Signals queued for the watcher at most (zbus's default); the stream is read all the time,
/// and while the watcher waits for a call, the rest waits in the socket.
const SIGNAL_QUEUE: NonZeroUsize = NonZeroUsize::new(64).expect("64 is not zero");

/// How much of an error text from the container's bus (an error reply's message) is quoted.
const MAX_ERROR_TEXT: usize = 512;

/// How many failed units inside `status` names: a container may report any number.
const MAX_FAILED_LISTED: usize = 32;

/// One connection attempt to a running container's bus, without waiting (for `status`).
pub async fn connect_now(init_pid: i32) -> Result<Inner, InnerError> {
    connect_once(init_pid).await
}

impl Inner {
    /// Every unit inside whose ActiveState is `failed` (what `systemctl --failed` lists),
    /// each name checked ([`unit_name`]).
    /// At most [`MAX_FAILED_LISTED`] are named; the rest are counted in one last entry.
    pub async fn failed_units(&self) -> Result<Vec<String>, InnerError> {
        let units = self.manager.list_units_filtered(&["failed"]).await?;
        let more = units.len().saturating_sub(MAX_FAILED_LISTED);
        let mut names: Vec<String> = units
            .into_iter()
            .take(MAX_FAILED_LISTED)
            .map(|u| unit_name(&u.0).into_owned())
            .collect();
        if more > 0 {
            names.push(format!("(and {more} more)"));
        }
        Ok(names)
    }
}

/// Where the container's system bus is, for messages: the path inside, and whose root.
pub fn bus_socket(init_pid: i32) -> PathBuf {
    PathBuf::from(format!("{BUS_PATH} in the root of pid {init_pid}"))
}

/// Whether the image has a D-Bus system bus at all (readiness needs one): a unit file for
/// dbus-daemon or dbus-broker under the container's root (`/proc/<init pid>/root`), looked
/// up inside that root.
pub fn image_has_dbus(root: &Path) -> bool {
    [
        "usr/lib/systemd/system",
        "lib/systemd/system",
        "etc/systemd/system",
    ]
    .iter()
    .flat_map(|d| ["dbus.service", "dbus-broker.service"].map(|u| format!("{d}/{u}")))
    .any(|p| open_in_root(root, &p).is_ok_and(|f| f.kind == SFlag::S_IFREG))
}

/// A required unit as last seen; every field checked with [`enum_value`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub result: String,
}

/// The inside, summarised: enough to decide readiness and write `STATUS=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InnerState {
    /// `SystemState` of the inner manager (`initializing`, `starting`, `running`,
    /// `degraded`, `stopping`, …); refreshed at StartupFinished. Checked ([`enum_value`]).
    pub system_state: String,
    /// Jobs queued inside (counted from JobNew/JobRemoved after one initial read).
    pub jobs: u32,
    /// Keyed by the names of the service file's required units, never by a name the
    /// container gave.
    pub units: BTreeMap<String, UnitState>,
}

/// What a job for one of the shutdown targets means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Reboot,
    Poweroff,
    Halt,
}

impl Shutdown {
    pub fn as_str(self) -> &'static str {
        match self {
            Shutdown::Reboot => "reboot",
            Shutdown::Poweroff => "poweroff",
            Shutdown::Halt => "halt",
        }
    }

    fn from_target(unit: &str) -> Option<Shutdown> {
        match unit {
            "reboot.target" | "kexec.target" | "ctrl-alt-del.target" => Some(Shutdown::Reboot),
            "poweroff.target" | "exit.target" => Some(Shutdown::Poweroff),
            "halt.target" => Some(Shutdown::Halt),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InnerEvent {
    /// Connected and subscribed; the first full state.
    Connected(InnerState),
    /// Something changed (a unit, the job count, the boot finished).
    Changed(InnerState),
    /// A required unit's ActiveState changed: (unit, new state). Logged by the loop.
    UnitChanged(String, UnitState),
    /// A job for reboot/poweroff/halt was queued inside.
    Shutdown(Shutdown),
    /// The bus went away (the container is going down, or dbus died inside), and why (one
    /// line).
    Lost(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InnerError {
    #[error("the container's system bus {path} did not appear within {secs} s{}", last_reason(.last))]
    BusTimeout {
        path: PathBuf,
        secs: u64,
        /// Why the last attempt failed, if one was made.
        last: Option<String>,
    },
    #[error("the container's system bus {path} did not complete the handshake within {ms} ms")]
    Handshake { path: PathBuf, ms: u128 },
    #[error("resolving the container's system bus inside its root: {0}")]
    ResolveInnerBus(#[source] InRootError),
    #[error("the container's system bus {path} is not a socket")]
    NotASocket { path: PathBuf },
    #[error("connecting to the container's system bus {path}: {source}")]
    ConnectSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the container's system bus {path} is served by pid {peer}, which is not in the container's PID namespace (that of pid {init_pid}); refusing to talk to it\n  hint: something in the container (or a bind mount) points {BUS_PATH} at a socket of the host")]
    PeerOutsideContainer {
        path: PathBuf,
        init_pid: i32,
        peer: i32,
    },
    #[error("the container's system bus {path}: cannot tell which process serves it: {why}")]
    PeerUnknown { path: PathBuf, why: String },
    #[error("connecting to the container's system bus {path}: {}", one_line(&.source.to_string(), MAX_ERROR_TEXT))]
    ConnectInnerBus {
        path: PathBuf,
        #[source]
        source: zbus::Error,
    },
    #[error("the container's systemd did not answer within {} s", CALL_TIMEOUT.as_secs())]
    CallTimeout(#[source] zbus::Error),
    #[error("talking to the container's systemd: {}", one_line(&.0.to_string(), MAX_ERROR_TEXT))]
    Call(#[source] zbus::Error),
}

fn last_reason(last: &Option<String>) -> String {
    last.as_ref()
        .map_or_else(String::new, |l| format!("; last attempt: {l}"))
}

impl From<zbus::Error> for InnerError {
    fn from(e: zbus::Error) -> Self {
        match &e {
            zbus::Error::InputOutput(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                InnerError::CallTimeout(e)
            }
            _ => InnerError::Call(e),
        }
    }
}

impl InnerError {
    /// The bus at the path is not the container's own: served from outside its PID
    /// namespace, not a socket, or behind a symlink loop.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            InnerError::PeerOutsideContainer { .. }
                | InnerError::NotASocket { .. }
                | InnerError::ResolveInnerBus(InRootError::TooManyLinks { .. })
        )
    }

    /// Worth another attempt while the container boots: nothing at the path yet, nobody
    /// accepting, or a bus that does not answer yet. A socket that is not the container's or
    /// a path that is not a socket is refused at once.
    fn is_transient(&self) -> bool {
        match self {
            InnerError::ResolveInnerBus(e) => {
                e.is_not_found()
                    || matches!(
                        e,
                        InRootError::Walk {
                            source: nix::errno::Errno::ENOTDIR,
                            ..
                        }
                    )
            }
            InnerError::ConnectSocket { .. }
            | InnerError::ConnectInnerBus { .. }
            | InnerError::Handshake { .. }
            | InnerError::PeerUnknown { .. } => true,
            _ => false,
        }
    }
}

/// A live connection to the inner manager (the calls connection: no signal streams).
#[derive(Clone)]
pub struct Inner {
    pub manager: ManagerProxy<'static>,
    init_pid: i32,
}

impl Inner {
    /// Waits (bounded backoff: the socket appears a few hundred ms into boot) for the bus
    /// socket and connects. `alive()` ends the wait early when the container dies.
    pub async fn connect(
        init_pid: i32,
        within: Duration,
        alive: impl Fn() -> bool,
    ) -> Result<Inner, InnerError> {
        let deadline = Instant::now() + within;
        let mut wait = Duration::from_millis(10);
        let mut last: Option<String>;
        loop {
            // Bounded: a socket that is bound but not served yet would hang the handshake.
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(5));
            let res = match tokio::time::timeout(attempt, connect_once(init_pid)).await {
                Ok(r) => r,
                Err(_) => Err(InnerError::Handshake {
                    path: bus_socket(init_pid),
                    ms: attempt.as_millis(),
                }),
            };
            match res {
                Ok(i) => return Ok(i),
                // dbus-daemon may not have bound the socket, or not accept yet.
                Err(e) if e.is_transient() => {
                    debug!(error = %e, "inner bus not answering yet");
                    last = Some(e.to_string());
                }
                Err(e) => return Err(e),
            }
            if !alive() || Instant::now() + wait >= deadline {
                return Err(InnerError::BusTimeout {
                    path: bus_socket(init_pid),
                    secs: within.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// A bounded round trip: does the inner manager answer?
    pub async fn ping(&self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.manager.version()).await,
            Ok(Ok(_))
        )
    }

    /// `ResetFailed` then `RestartUnit(name, "replace")`: the restart-unit policy.
    pub async fn restart_unit(&self, name: &str) -> Result<(), InnerError> {
        self.manager.reset_failed_unit(name).await?;
        self.manager.restart_unit(name, "replace").await?;
        Ok(())
    }
}

/// Opens the container's bus socket inside its root, connects through the O_PATH fd and
/// checks who serves it (see the module doc). Never blocks: a listener whose backlog is
/// full fails the non-blocking connect (EAGAIN), and the caller tries again.
pub async fn connect_socket(init_pid: i32) -> Result<tokio::net::UnixStream, InnerError> {
    let path = bus_socket(init_pid);
    let root = PathBuf::from(format!("/proc/{init_pid}/root"));
    let found = open_in_root(&root, BUS_PATH).map_err(InnerError::ResolveInnerBus)?;
    if found.kind != SFlag::S_IFSOCK {
        return Err(InnerError::NotASocket { path });
    }
    // The very inode found above, whatever the name points to by now.
    let by_fd = format!("/proc/self/fd/{}", found.fd.as_raw_fd());
    let stream = tokio::net::UnixStream::connect(&by_fd)
        .await
        .map_err(|source| InnerError::ConnectSocket {
            path: path.clone(),
            source,
        })?;
    drop(found);
    check_peer(init_pid, &stream, &path)?;
    Ok(stream)
}

/// The bus must be served from inside: the peer's PID namespace is the container's. For a
/// socket systemd activates, the peer is the init that listened; for dbus-daemon's own, the
/// daemon; either is inside. A host process is not.
fn check_peer(
    init_pid: i32,
    stream: &tokio::net::UnixStream,
    path: &Path,
) -> Result<(), InnerError> {
    let unknown = |why: String| InnerError::PeerUnknown {
        path: path.to_owned(),
        why,
    };
    let cred = stream.peer_cred().map_err(|e| unknown(e.to_string()))?;
    // 0 or none: the peer's PID namespace is not one we can see into, so not the
    // container's, which is a child of ours.
    let Some(peer) = cred.pid().filter(|p| *p > 0) else {
        return Err(InnerError::PeerOutsideContainer {
            path: path.to_owned(),
            init_pid,
            peer: cred.pid().unwrap_or(0),
        });
    };
    let ns =
        |pid: i32| std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| (m.dev(), m.ino()));
    let want = ns(init_pid).map_err(|e| unknown(format!("/proc/{init_pid}/ns/pid: {e}")))?;
    let got = ns(peer).map_err(|e| unknown(format!("/proc/{peer}/ns/pid: {e}")))?;
    if got != want {
        return Err(InnerError::PeerOutsideContainer {
            path: path.to_owned(),
            init_pid,
            peer,
        });
    }
    Ok(())
}

/// A bus connection over the checked socket, every call bounded by [`CALL_TIMEOUT`].
async fn connection(init_pid: i32) -> Result<zbus::Connection, InnerError> {
    let stream = connect_socket(init_pid).await?;
    let stream = stream
        .into_std()
        .map_err(|source| InnerError::ConnectSocket {
            path: bus_socket(init_pid),
            source,
        })?;
    zbus::connection::Builder::unix_stream(stream)
        .method_timeout(CALL_TIMEOUT)
        .build()
        .await
        .map_err(|source| InnerError::ConnectInnerBus {
            path: bus_socket(init_pid),
            source,
        })
}

async fn connect_once(init_pid: i32) -> Result<Inner, InnerError> {
    let conn = connection(init_pid).await?;
    let manager = ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|source| InnerError::ConnectInnerBus {
            path: bus_socket(init_pid),
            source,
        })?;
    Ok(Inner { manager, init_pid })
}

/// A signal of the inner manager, as the watcher needs it.
enum Sig {
    JobNew(String),
    JobRemoved,
    StartupFinished,
    /// A required unit's properties: (our name for it, interface, changed string values).
    Props(Vec<String>, String, Vec<(String, String)>),
}

const MANAGER_IFACE: &str = "org.freedesktop.systemd1.Manager";
const PROPS_IFACE: &str = "org.freedesktop.DBus.Properties";

/// One signal, if it is one we follow and well-formed; anything else is ignored (a
/// malformed signal from inside ends nothing).
fn parse_signal(msg: &zbus::Message, paths: &BTreeMap<String, Vec<String>>) -> Option<Sig> {
    let hdr = msg.header();
    let iface = hdr.interface()?.as_str();
    let member = hdr.member()?.as_str();
    match (iface, member) {
        (MANAGER_IFACE, "JobNew") => {
            let (_, _, unit): (u32, OwnedObjectPath, String) = msg.body().deserialize().ok()?;
            Some(Sig::JobNew(unit_name(&unit).into_owned()))
        }
        (MANAGER_IFACE, "JobRemoved") => Some(Sig::JobRemoved),
        (MANAGER_IFACE, "StartupFinished") => Some(Sig::StartupFinished),
        (PROPS_IFACE, "PropertiesChanged") => {
            let units = paths.get(hdr.path()?.as_str())?;
            let (iface, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                msg.body().deserialize().ok()?;
            Some(Sig::Props(
                units.clone(),
                iface,
                changed
                    .iter()
                    .filter_map(|(k, v)| string_of(v).map(|v| (k.clone(), v)))
                    .collect(),
            ))
        }
        _ => None,
    }
}

/// Subscribes and follows the inner manager until the bus goes away, sending events.
/// `booted_is_enough`: `running` and `degraded` both count as booted
/// (`readiness.accept_degraded`), so the end of the boot needs no D-Bus read before it is
/// reported.
pub async fn watch(inner: Inner, required: Vec<String>, booted_is_enough: bool, tx: InnerSender) {
    let followed = async {
        // The handshake is not a call: bound it the same.
        let signals = tokio::time::timeout(CALL_TIMEOUT, connection(inner.init_pid))
            .await
            .map_err(|_| InnerError::Handshake {
                path: bus_socket(inner.init_pid),
                ms: CALL_TIMEOUT.as_millis(),
            })??;
        follow(&inner.manager, &signals, &required, booted_is_enough, &tx).await
    };
    if let Err(e) = followed.await {
        tx.send(InnerEvent::Lost(e.to_string()));
    }
}

/// The watch itself: calls through `m` (a connection without signal streams), signals from
/// `signals` (a connection of their own).
async fn follow(
    m: &ManagerProxy<'static>,
    signals: &zbus::Connection,
    required: &[String],
    booted_is_enough: bool,
    tx: &InnerSender,
) -> Result<(), InnerError> {
    let conn = m.inner().connection().clone();
    // The signals' one stream first (its match rule is added before anything is read),
    // then Subscribe, then read the state: no change can slip between the read and the
    // first signal.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.systemd1")
        .path_namespace("/org/freedesktop/systemd1")
        .build()?;
    let mut stream = zbus::MessageStream::for_match_rule(rule, signals, Some(SIGNAL_QUEUE)).await?;
    // The object path of each required unit → our names for it (the container chooses the
    // paths; two names may share one).
    let mut paths: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in required {
        let path = m.load_unit(name).await?;
        paths
            .entry(path.to_string())
            .or_default()
            .push(name.clone());
    }
    m.subscribe().await?;
    let mut state = InnerState {
        system_state: enum_value(&m.system_state().await?).into_owned(),
        jobs: m.n_jobs().await?,
        units: BTreeMap::new(),
    };
    for (path, names) in &paths {
        let u = read_unit(&conn, path).await?;
        for name in names {
            state.units.insert(name.clone(), u.clone());
        }
    }
    tx.send(InnerEvent::Connected(state.clone()));
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        let Some(sig) = parse_signal(&msg, &paths) else {
            continue;
        };
        match sig {
            Sig::JobNew(unit) => {
                state.jobs = state.jobs.saturating_add(1);
                if let Some(kind) = Shutdown::from_target(&unit) {
                    info!(INNER_UNIT = %unit, "shutdown job queued inside");
                    tx.send(InnerEvent::Shutdown(kind));
                }
            }
            Sig::JobRemoved => state.jobs = state.jobs.saturating_sub(1),
            Sig::StartupFinished => {
                // The boot is over: SystemState is now running or degraded. When either
                // will do, say so at once (READY=1 needs no round trip), then read which.
                // The job count is known from JobNew/JobRemoved.
                if booted_is_enough {
                    state.system_state = "running".into();
                    tx.send(InnerEvent::Changed(state.clone()));
                }
                state.system_state = enum_value(&m.system_state().await?).into_owned();
            }
            Sig::Props(units, iface, changed) => {
                let mut changes = Vec::new();
                for unit in units {
                    let Some(u) = state.units.get_mut(&unit) else {
                        continue;
                    };
                    let before = u.clone();
                    for (k, v) in &changed {
                        let v = enum_value(v).into_owned();
                        match (iface.as_str(), k.as_str()) {
                            ("org.freedesktop.systemd1.Unit", "ActiveState") => u.active_state = v,
                            ("org.freedesktop.systemd1.Unit", "SubState") => u.sub_state = v,
                            ("org.freedesktop.systemd1.Unit", "LoadState") => u.load_state = v,
                            ("org.freedesktop.systemd1.Service", "Result") => u.result = v,
                            _ => {}
                        }
                    }
                    if *u != before {
                        changes.push((unit, u.clone()));
                    }
                }
                if changes.is_empty() {
                    continue;
                }
                // A unit that fails changes SystemState to degraded (and back): re-read it
                // on unit changes after boot, one round trip per change of a required unit.
                if is_booted_state(&state.system_state) {
                    state.system_state = enum_value(&m.system_state().await?).into_owned();
                }
                for (unit, u) in changes {
                    tx.send(InnerEvent::UnitChanged(unit, u));
                }
            }
        }
        tx.send(InnerEvent::Changed(state.clone()));
    }
    warn!("the container's system bus closed");
    tx.send(InnerEvent::Lost("the container's system bus closed".into()));
    Ok(())
}

async fn read_unit(conn: &zbus::Connection, path: &str) -> Result<UnitState, InnerError> {
    let unit = UnitProxy::builder(conn)
        .path(path.to_owned())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let service = ServiceUnitProxy::builder(conn)
        .path(path.to_owned())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    Ok(UnitState {
        load_state: enum_value(&unit.load_state().await?).into_owned(),
        active_state: enum_value(&unit.active_state().await?).into_owned(),
        sub_state: enum_value(&unit.sub_state().await?).into_owned(),
        // Not every unit type has a Result (targets do not).
        result: enum_value(&service.result().await.unwrap_or_default()).into_owned(),
    })
}

fn string_of(v: &OwnedVariant) -> Option<String> {
    match &**v {
        Variant::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

pub fn is_booted_state(s: &str) -> bool {
    matches!(s, "running" | "degraded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbus_is_found_in_the_image_root() {
        let d = tempfile::tempdir().unwrap();
        assert!(!image_has_dbus(d.path()));
        std::fs::create_dir_all(d.path().join("usr/lib/systemd/system")).unwrap();
        std::fs::write(
            d.path().join("usr/lib/systemd/system/dbus-broker.service"),
            "",
        )
        .unwrap();
        assert!(image_has_dbus(d.path()));
    }

    #[test]
    fn shutdown_targets() {
        assert_eq!(
            Shutdown::from_target("reboot.target"),
            Some(Shutdown::Reboot)
        );
        assert_eq!(
            Shutdown::from_target("poweroff.target"),
            Some(Shutdown::Poweroff)
        );
        assert_eq!(Shutdown::from_target("halt.target"), Some(Shutdown::Halt));
        assert_eq!(Shutdown::from_target("multi-user.target"), None);
    }
}
