//! The host's systemd (PID 1), as `update` drives it: which unit runs a service here, a
//! stop or start job waited for to its end, and the unit's state while an update is on
//! probation. Over the system bus (dbus-daemon or dbus-broker, on every EL host), as
//! `status` asks it.
//!
//! Not PID 1's private socket (`/run/systemd/private`, which systemctl uses as root): on
//! it systemd sets the messages' sender to `org.freedesktop.systemd1`
//! (`sd_bus_set_sender()` on private connections), a well-known name where the D-Bus
//! specification has a unique name, and zbus refuses such a message ("Invalid unique
//! name") — its reply to the first call already.
//!
//! What PID 1 says is the host's own word (not the container's): still, every text that
//! reaches a terminal or the journal goes through [`crate::os::sanitize`] where it is
//! shown, as for any state read from outside this process.

use std::time::Duration;

use futures_util::StreamExt;
use zbus::OwnedObjectPath;

/// Property changes queued for a probation's watch (only "something changed" matters).
const WATCH_QUEUE: std::num::NonZeroUsize =
    std::num::NonZeroUsize::new(1024).expect("1024 is not zero");

/// JobRemoved signals queued while a stop or start call's reply is awaited.
const JOB_QUEUE: std::num::NonZeroUsize =
    std::num::NonZeroUsize::new(4096).expect("4096 is not zero");

/// Each D-Bus call gets an answer within this (sd-bus's default method timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(25);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait HostManager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait HostUnit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "InvocationID")]
    fn invocation_id(&self) -> zbus::Result<Vec<u8>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait HostService {
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn status_text(&self) -> zbus::Result<String>;
}

#[derive(Debug, thiserror::Error)]
pub enum HostBusError {
    #[error("cannot reach the host's systemd on the system bus: {0}")]
    Connect(zbus::Error),
    #[error("the host's systemd: {what} {unit}: {source}")]
    Call {
        what: &'static str,
        unit: String,
        source: zbus::Error,
    },
    #[error("the host's systemd: the {what} job of {unit} did not end within {} s", .within.as_secs())]
    JobTimeout {
        what: &'static str,
        unit: String,
        within: Duration,
    },
}

/// A unit's state as `update` judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub active_state: String,
    pub sub_state: String,
    /// The service's `Result` (`success`, `exit-code`, `timeout`, `watchdog` …).
    pub result: String,
    pub n_restarts: u32,
    pub main_pid: u32,
    /// Changes with each start of the unit (a restart included).
    pub invocation_id: Vec<u8>,
    pub status_text: String,
}

/// A connection to the host's systemd, subscribed to its job signals.
pub struct HostSystemd {
    conn: zbus::Connection,
    manager: HostManagerProxy<'static>,
}

impl HostSystemd {
    /// On the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
    pub async fn connect() -> Result<HostSystemd, HostBusError> {
        let conn = zbus::connection::Builder::system()
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
            .map_err(HostBusError::Connect)?;
        let manager = HostManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(HostBusError::Connect)?;
        // Without Subscribe() PID 1 sends no JobRemoved (nor PropertiesChanged).
        manager.subscribe().await.map_err(HostBusError::Connect)?;
        Ok(HostSystemd { conn, manager })
    }

    /// Which unit runs service `name` here: the generated `NAME.service` or the template's
    /// `apptainer-supervisor@NAME.service`, whichever is active or activating (they conflict,
    /// so at most one is). `None`: neither.
    pub async fn running_unit(&self, name: &str) -> Result<Option<String>, HostBusError> {
        for unit in unit_names(name) {
            if let Some(s) = self.state(&unit).await? {
                if matches!(
                    s.active_state.as_str(),
                    "active" | "activating" | "reloading"
                ) {
                    return Ok(Some(unit));
                }
            }
        }
        Ok(None)
    }

    /// The unit's state; `None` when it is not loaded.
    pub async fn state(&self, unit: &str) -> Result<Option<UnitState>, HostBusError> {
        let path = match self.manager.get_unit(unit).await {
            Ok(p) => p,
            Err(e) if no_such_unit(&e) => return Ok(None),
            Err(source) => return Err(call("GetUnit", unit, source)),
        };
        let err = |source| call("reading the state of", unit, source);
        let u = HostUnitProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(err)?;
        let s = HostServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(err)?;
        Ok(Some(UnitState {
            active_state: u.active_state().await.map_err(err)?,
            sub_state: u.sub_state().await.map_err(err)?,
            invocation_id: u.invocation_id().await.map_err(err)?,
            result: s.result().await.map_err(err)?,
            n_restarts: s.n_restarts().await.map_err(err)?,
            main_pid: s.main_pid().await.map_err(err)?,
            status_text: s.status_text().await.map_err(err)?,
        }))
    }

    /// `StopUnit(unit, "replace")`, waited for until its job is removed; the job's result
    /// (`done`, `canceled`, `timeout`, `failed` …).
    pub async fn stop(&self, unit: &str, within: Duration) -> Result<String, HostBusError> {
        self.job("stop", unit, within).await
    }

    /// `StartUnit(unit, "replace")`, waited for until its job is removed. For a
    /// `Type=notify` service the job ends when READY=1 came (`done`) or the start failed.
    pub async fn start(&self, unit: &str, within: Duration) -> Result<String, HostBusError> {
        self.job("start", unit, within).await
    }

    /// `ResetFailedUnit`: a unit left failed by an earlier attempt loses that state, and
    /// its `NRestarts` goes back to 0, so that what follows speaks of the next start only.
    /// A unit that is not loaded (systemd unloads a stopped unit nothing refers to) has
    /// nothing to reset.
    pub async fn reset_failed(&self, unit: &str) -> Result<(), HostBusError> {
        match self.manager.reset_failed_unit(unit).await {
            Ok(()) => Ok(()),
            Err(e) if no_such_unit(&e) => Ok(()),
            Err(source) => Err(call("ResetFailedUnit", unit, source)),
        }
    }

    async fn job(
        &self,
        what: &'static str,
        unit: &str,
        within: Duration,
    ) -> Result<String, HostBusError> {
        // The stream first: the job can end before the call's reply is read. Its own queue,
        // large: while the call's reply is awaited nothing reads the stream, and a full
        // queue would stall the connection's reader (a busy host's other jobs).
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.systemd1.Manager")
            .member("JobRemoved")
            .path("/org/freedesktop/systemd1")
            .build()
            .map_err(|source| call(what, unit, source))?;
        let mut removed = zbus::MessageStream::for_match_rule(rule, &self.conn, Some(JOB_QUEUE))
            .await
            .map_err(|source| call(what, unit, source))?;
        let job = match what {
            "stop" => self.manager.stop_unit(unit, "replace").await,
            _ => self.manager.start_unit(unit, "replace").await,
        }
        .map_err(|source| call(what, unit, source))?;
        let ended = tokio::time::timeout(within, async {
            while let Some(msg) = removed.next().await {
                let Ok(msg) = msg else { continue };
                if let Ok((_id, removed_job, _unit, result)) =
                    msg.body()
                        .deserialize::<(u32, OwnedObjectPath, String, String)>()
                {
                    if removed_job == job {
                        return Some(result);
                    }
                }
            }
            None
        })
        .await;
        match ended {
            Ok(Some(result)) => Ok(result),
            Ok(None) => Err(call(
                what,
                unit,
                zbus::Error::Failure("the connection to PID 1 ended".into()),
            )),
            Err(_) => Err(HostBusError::JobTimeout {
                what,
                unit: unit.to_owned(),
                within,
            }),
        }
    }

    /// A watch on the unit's properties (`PropertiesChanged` on its object, sent to
    /// subscribers), so that a probation reacts when the unit does instead of polling it.
    /// Made before the state is first read, so no change falls between the two.
    pub async fn watch(&self, unit: &str) -> Result<UnitWatch, HostBusError> {
        let path = self
            .manager
            .load_unit(unit)
            .await
            .map_err(|source| call("LoadUnit", unit, source))?;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .path(path)
            .build()
            .map_err(|source| call("watching", unit, source))?;
        let stream = zbus::MessageStream::for_match_rule(rule, &self.conn, Some(WATCH_QUEUE))
            .await
            .map_err(|source| call("watching", unit, source))?;
        Ok(UnitWatch { stream })
    }
}

/// See [`HostSystemd::watch`].
pub struct UnitWatch {
    stream: zbus::MessageStream,
}

impl UnitWatch {
    /// Until the next change of the unit, or `within`; every change queued by then is
    /// taken too (one look at the state covers them all).
    pub async fn changed(&mut self, within: Duration) {
        use futures_util::FutureExt;
        if tokio::time::timeout(within, self.stream.next())
            .await
            .is_ok()
        {
            while let Some(Some(_)) = self.stream.next().now_or_never() {}
        }
    }
}

/// The two units a service can run as, the generated one first.
pub fn unit_names(name: &str) -> [String; 2] {
    [
        format!("{name}.service"),
        format!("apptainer-supervisor@{name}.service"),
    ]
}

/// systemd's answer for a unit that is not loaded.
fn no_such_unit(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, _, _)
        if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit")
}

fn call(what: &'static str, unit: &str, source: zbus::Error) -> HostBusError {
    HostBusError::Call {
        what,
        unit: unit.to_owned(),
        source,
    }
}
