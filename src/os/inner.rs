//! The container's own systemd, over the container's system bus.
//!
//! We connect as root to `unix:path=/proc/<init pid>/root/run/dbus/system_bus_socket` — the
//! bus inside, reached through the init's root. Not the private socket
//! `/run/systemd/private`: systemd refuses a peer whose PID it cannot see in its PID
//! namespace, and zbus rejects systemd's replies there (shared/reference,
//! real-systemd-in-namespaces.md). We call `Subscribe()` and follow signals (`JobNew`,
//! `JobRemoved`, `StartupFinished`, `PropertiesChanged` of each required unit); nothing
//! polls for state. A task owns the connection and sends [`InnerEvent`]s to the event loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::stream::{select_all, BoxStream, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zbus::{OwnedObjectPath, Variant};

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

    #[zbus(signal)]
    fn job_new(&self, id: u32, job: OwnedObjectPath, unit: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn startup_finished(
        &self,
        firmware: u64,
        loader: u64,
        kernel: u64,
        initrd: u64,
        userspace: u64,
        total: u64,
    ) -> zbus::Result<()>;
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

/// One connection attempt to a running container's bus, without waiting (for `status`).
pub async fn connect_now(init_pid: i32) -> Result<Inner, InnerError> {
    connect_once(&bus_socket(init_pid)).await
}

impl Inner {
    /// Every unit inside whose ActiveState is `failed` (what `systemctl --failed` lists).
    pub async fn failed_units(&self) -> Result<Vec<String>, zbus::Error> {
        let units = self.manager.list_units_filtered(&["failed"]).await?;
        Ok(units.into_iter().map(|u| u.0).collect())
    }
}

/// Where the container's system bus is, seen from the host.
pub fn bus_socket(init_pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{init_pid}/root/run/dbus/system_bus_socket"))
}

/// Whether the image has a D-Bus system bus at all (readiness needs one): a unit file for
/// dbus-daemon or dbus-broker under the container's root (`/proc/<init pid>/root`).
pub fn image_has_dbus(root: &Path) -> bool {
    [
        "usr/lib/systemd/system",
        "lib/systemd/system",
        "etc/systemd/system",
    ]
    .iter()
    .flat_map(|d| ["dbus.service", "dbus-broker.service"].map(|u| root.join(d).join(u)))
    .any(|p| p.exists())
}

/// A required unit as last seen.
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
    /// `degraded`, `stopping`, …); refreshed at StartupFinished.
    pub system_state: String,
    /// Jobs queued inside (counted from JobNew/JobRemoved after one initial read).
    pub jobs: u32,
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

#[derive(Debug)]
pub enum InnerEvent {
    /// Connected and subscribed; the first full state.
    Connected(InnerState),
    /// Something changed (a unit, the job count, the boot finished).
    Changed(InnerState),
    /// A required unit's ActiveState changed: (unit, new state). Logged by the loop.
    UnitChanged(String, UnitState),
    /// A job for reboot/poweroff/halt was queued inside.
    Shutdown(Shutdown),
    /// The bus went away (the container is going down, or dbus died inside).
    Lost(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InnerError {
    #[error("the container's system bus {path} did not appear within {secs} s")]
    BusTimeout { path: PathBuf, secs: u64 },
    #[error("connecting to the container's system bus {path}: {source}")]
    ConnectInnerBus {
        path: PathBuf,
        #[source]
        source: zbus::Error,
    },
    #[error("talking to the container's systemd: {0}")]
    Call(#[from] zbus::Error),
}

/// A live connection to the inner manager.
#[derive(Clone)]
pub struct Inner {
    pub manager: ManagerProxy<'static>,
}

impl Inner {
    /// Waits (bounded backoff: the socket appears a few hundred ms into boot) for the bus
    /// socket and connects. `alive()` ends the wait early when the container dies.
    pub async fn connect(
        init_pid: i32,
        within: Duration,
        alive: impl Fn() -> bool,
    ) -> Result<Inner, InnerError> {
        let path = bus_socket(init_pid);
        let deadline = tokio::time::Instant::now() + within;
        let mut wait = Duration::from_millis(10);
        loop {
            if path.exists() {
                // Bounded: a socket that is bound but not served yet would hang the handshake.
                let attempt = deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(Duration::from_secs(5));
                let res = match tokio::time::timeout(attempt, connect_once(&path)).await {
                    Ok(r) => r,
                    Err(_) => Err(InnerError::BusTimeout {
                        path: path.clone(),
                        secs: attempt.as_secs(),
                    }),
                };
                match res {
                    Ok(i) => return Ok(i),
                    // dbus-daemon may have bound the socket but not be accepting yet.
                    Err(e) if tokio::time::Instant::now() + wait < deadline => {
                        debug!(error = %e, "inner bus not answering yet")
                    }
                    Err(e) => return Err(e),
                }
            }
            if !alive() || tokio::time::Instant::now() + wait >= deadline {
                return Err(InnerError::BusTimeout {
                    path,
                    secs: within.as_secs(),
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
    pub async fn restart_unit(&self, name: &str) -> Result<(), zbus::Error> {
        self.manager.reset_failed_unit(name).await?;
        self.manager.restart_unit(name, "replace").await?;
        Ok(())
    }
}

async fn connect_once(path: &Path) -> Result<Inner, InnerError> {
    let err = |source| InnerError::ConnectInnerBus {
        path: path.to_owned(),
        source,
    };
    let address = format!("unix:path={}", path.display());
    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .map_err(err)?;
    let manager = ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(err)?;
    Ok(Inner { manager })
}

enum Sig {
    JobNew(String),
    JobRemoved,
    StartupFinished,
    Props(String, String, Vec<(String, String)>),
    Ended,
}

/// Subscribes and follows the inner manager until the bus goes away, sending events.
/// `booted_is_enough`: `running` and `degraded` both count as booted
/// (`readiness.accept_degraded`), so the end of the boot needs no D-Bus read before it is
/// reported.
pub async fn watch(
    inner: Inner,
    required: Vec<String>,
    booted_is_enough: bool,
    tx: mpsc::UnboundedSender<InnerEvent>,
) {
    if let Err(e) = watch_inner(&inner, &required, booted_is_enough, &tx).await {
        let _ = tx.send(InnerEvent::Lost(e.to_string()));
    }
}

async fn watch_inner(
    inner: &Inner,
    required: &[String],
    booted_is_enough: bool,
    tx: &mpsc::UnboundedSender<InnerEvent>,
) -> Result<(), zbus::Error> {
    let m = &inner.manager;
    let conn = m.inner().connection().clone();
    // Streams first (they add the match rules), then Subscribe, then read the state: no
    // change can slip between the read and the first signal.
    let mut streams: Vec<BoxStream<'static, Sig>> = vec![
        m.receive_job_new()
            .await?
            .map(|s| s.args().map_or(Sig::Ended, |a| Sig::JobNew(a.unit)))
            .boxed(),
        m.receive_job_removed()
            .await?
            .map(|s| s.args().map_or(Sig::Ended, |_| Sig::JobRemoved))
            .boxed(),
        m.receive_startup_finished()
            .await?
            .map(|_| Sig::StartupFinished)
            .boxed(),
    ];
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    for name in required {
        let path = m.load_unit(name).await?;
        let props = zbus::fdo::PropertiesProxy::builder(&conn)
            .destination("org.freedesktop.systemd1")
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let unit = name.clone();
        streams.push(
            props
                .receive_properties_changed()
                .await?
                .map(move |s| match s.args() {
                    Ok(a) => Sig::Props(
                        unit.clone(),
                        a.interface_name().to_string(),
                        a.changed_properties()
                            .iter()
                            .filter_map(|(k, v)| string_of(v).map(|v| (k.to_string(), v)))
                            .collect(),
                    ),
                    Err(_) => Sig::Ended,
                })
                .boxed(),
        );
        paths.insert(name.clone(), path.to_string());
    }
    m.subscribe().await?;
    let mut state = InnerState {
        system_state: m.system_state().await?,
        jobs: m.n_jobs().await?,
        units: BTreeMap::new(),
    };
    for (name, path) in &paths {
        state
            .units
            .insert(name.clone(), read_unit(&conn, path).await?);
    }
    let _ = tx.send(InnerEvent::Connected(state.clone()));
    let mut all = select_all(streams);
    while let Some(sig) = all.next().await {
        match sig {
            Sig::JobNew(unit) => {
                state.jobs += 1;
                if let Some(kind) = Shutdown::from_target(&unit) {
                    info!(INNER_UNIT = %unit, "shutdown job queued inside");
                    let _ = tx.send(InnerEvent::Shutdown(kind));
                }
            }
            Sig::JobRemoved => state.jobs = state.jobs.saturating_sub(1),
            Sig::StartupFinished => {
                // The boot is over: SystemState is now running or degraded. When either
                // will do, say so at once (READY=1 needs no round trip), then read which.
                // The job count is known from JobNew/JobRemoved.
                if booted_is_enough {
                    state.system_state = "running".into();
                    let _ = tx.send(InnerEvent::Changed(state.clone()));
                }
                state.system_state = m.system_state().await?;
            }
            Sig::Props(unit, iface, changed) => {
                let Some(u) = state.units.get_mut(&unit) else {
                    continue;
                };
                let before = u.clone();
                for (k, v) in changed {
                    match (iface.as_str(), k.as_str()) {
                        ("org.freedesktop.systemd1.Unit", "ActiveState") => u.active_state = v,
                        ("org.freedesktop.systemd1.Unit", "SubState") => u.sub_state = v,
                        ("org.freedesktop.systemd1.Unit", "LoadState") => u.load_state = v,
                        ("org.freedesktop.systemd1.Service", "Result") => u.result = v,
                        _ => {}
                    }
                }
                if *u == before {
                    continue;
                }
                let u = u.clone();
                // A unit that fails changes SystemState to degraded (and back): re-read it
                // on unit changes after boot, one round trip per change of a required unit.
                if is_booted_state(&state.system_state) {
                    state.system_state = m.system_state().await?;
                }
                let _ = tx.send(InnerEvent::UnitChanged(unit, u));
            }
            Sig::Ended => break,
        }
        let _ = tx.send(InnerEvent::Changed(state.clone()));
    }
    warn!("the container's system bus closed");
    let _ = tx.send(InnerEvent::Lost("the container's system bus closed".into()));
    Ok(())
}

async fn read_unit(conn: &zbus::Connection, path: &str) -> Result<UnitState, zbus::Error> {
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
        load_state: unit.load_state().await?,
        active_state: unit.active_state().await?,
        sub_state: unit.sub_state().await?,
        // Not every unit type has a Result (targets do not).
        result: service.result().await.unwrap_or_default(),
    })
}

fn string_of(v: &Variant<'_>) -> Option<String> {
    match v {
        Variant::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

pub fn is_booted_state(s: &str) -> bool {
    matches!(s, "running" | "degraded")
}

/// Pure: readiness and the `STATUS=` line from the inner state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    pub status: String,
    /// Required units in `failed`: (unit, result).
    pub failed: Vec<(String, String)>,
}

pub fn verdict(s: &InnerState, required: &[String], accept_degraded: bool) -> Verdict {
    let booted = match s.system_state.as_str() {
        "running" => true,
        "degraded" => accept_degraded,
        _ => false,
    };
    let active = |u: &UnitState| u.active_state == "active";
    let n_active = required
        .iter()
        .filter(|r| s.units.get(*r).is_some_and(active))
        .count();
    let failed: Vec<(String, String)> = required
        .iter()
        .filter_map(|r| {
            s.units
                .get(r)
                .filter(|u| u.active_state == "failed")
                .map(|u| (r.clone(), failure_result(&u.result).to_owned()))
        })
        .collect();
    let waiting: Vec<String> = required
        .iter()
        .filter(|r| !s.units.get(*r).is_some_and(active))
        .map(|r| match s.units.get(r) {
            Some(u) if u.load_state == "not-found" => format!("{r} (not found)"),
            Some(u) if u.active_state == "failed" => {
                format!("{r} (failed: {})", or(&u.result, "?"))
            }
            Some(u) if !u.sub_state.is_empty() && u.active_state != "inactive" => {
                format!("{r} ({})", u.sub_state)
            }
            _ => r.clone(),
        })
        .collect();
    let ready = booted && n_active == required.len();
    let units = |n_active: usize| {
        if required.is_empty() {
            "no required units".to_owned()
        } else {
            format!("{n_active}/{} required units active", required.len())
        }
    };
    let status = match s.system_state.as_str() {
        "initializing" | "starting" | "" => {
            let mut st = format!("booting: {} jobs queued", s.jobs);
            if !waiting.is_empty() {
                st.push_str(&format!("; waiting for {}", waiting.join(", ")));
            }
            st
        }
        "degraded" if !accept_degraded => {
            "degraded: some unit failed inside (readiness.accept_degraded = false)".to_owned()
        }
        // stopping, maintenance, …: say it as it is.
        other if !is_booted_state(other) => format!("{other}: {}", units(n_active)),
        _ if !failed.is_empty() => {
            let list: Vec<String> = failed
                .iter()
                .map(|(u, r)| format!("{u} failed ({r})"))
                .collect();
            format!("degraded: {}", list.join(", "))
        }
        other if !waiting.is_empty() => {
            format!(
                "{other}: {}; waiting for {}",
                units(n_active),
                waiting.join(", ")
            )
        }
        other => format!("{other}: {}", units(n_active)),
    };
    Verdict {
        ready,
        status,
        failed,
    }
}

/// A failed unit's `Result`; systemd resets it to `success` a moment before the unit
/// leaves `failed` on a new start, and that is no reason to show.
fn failure_result(result: &str) -> &str {
    match result {
        "" | "success" => "failed",
        r => r,
    }
}

fn or<'a>(s: &'a str, d: &'a str) -> &'a str {
    if s.is_empty() {
        d
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(active: &str, sub: &str, result: &str) -> UnitState {
        UnitState {
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            result: result.into(),
        }
    }

    fn state(system: &str, jobs: u32, units: &[(&str, UnitState)]) -> InnerState {
        InnerState {
            system_state: system.into(),
            jobs,
            units: units
                .iter()
                .map(|(n, u)| (n.to_string(), u.clone()))
                .collect(),
        }
    }

    fn req(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn booting_shows_jobs_and_what_it_waits_for() {
        let s = state(
            "starting",
            12,
            &[("httpd.service", unit("activating", "start", ""))],
        );
        let v = verdict(&s, &req(&["httpd.service"]), true);
        assert!(!v.ready);
        assert_eq!(
            v.status,
            "booting: 12 jobs queued; waiting for httpd.service (start)"
        );
    }

    #[test]
    fn ready_when_booted_and_all_required_active() {
        let s = state(
            "running",
            0,
            &[("a.service", unit("active", "running", "success"))],
        );
        let v = verdict(&s, &req(&["a.service"]), true);
        assert!(v.ready);
        assert_eq!(v.status, "running: 1/1 required units active");
    }

    #[test]
    fn degraded_is_accepted_by_default_only() {
        let s = state("degraded", 0, &[]);
        let v = verdict(&s, &[], true);
        assert!(v.ready);
        assert_eq!(v.status, "degraded: no required units");
        let v = verdict(&s, &[], false);
        assert!(!v.ready);
        assert_eq!(
            v.status,
            "degraded: some unit failed inside (readiness.accept_degraded = false)"
        );
    }

    #[test]
    fn other_states_are_named() {
        let v = verdict(&state("stopping", 3, &[]), &[], true);
        assert_eq!(v.status, "stopping: no required units");
        assert!(!v.ready);
    }

    #[test]
    fn failed_required_unit_is_named_with_its_result() {
        let s = state(
            "degraded",
            0,
            &[
                ("a.service", unit("active", "running", "success")),
                ("httpd.service", unit("failed", "failed", "exit-code")),
            ],
        );
        let v = verdict(&s, &req(&["a.service", "httpd.service"]), true);
        assert!(!v.ready);
        assert_eq!(v.status, "degraded: httpd.service failed (exit-code)");
        assert_eq!(
            v.failed,
            [("httpd.service".to_string(), "exit-code".to_string())]
        );
    }

    #[test]
    fn missing_unit_is_named() {
        let mut u = unit("inactive", "dead", "");
        u.load_state = "not-found".into();
        let s = state("running", 0, &[("nope.service", u)]);
        let v = verdict(&s, &req(&["nope.service"]), true);
        assert_eq!(
            v.status,
            "running: 0/1 required units active; waiting for nope.service (not found)"
        );
    }

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
