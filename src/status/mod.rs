//! `apptainer-supervisor status`: every service of this host in one view, replacing the
//! rounds of `systemctl status X`, `apptainer instance list` and `apptainer exec
//! instance://X systemctl status` that operators make today.
//!
//! Sources, each read without side effects: the service files in the config directory, the
//! live state files the supervisors publish (`state.rs`), the host's systemd over the system
//! bus (the unit's ActiveState; `unknown` when there is no bus or no answer within a
//! second), the container's own systemd over its bus for failed units (root only, bounded),
//! the overlay image's superblock (fill, warning at 90 %), the image file's age, and for a
//! managed image the record of its updates (`update.rs`).
//! `collect` gathers, `render_table` and serde render; the JSON schema is documented in
//! apptainer-supervisor(8), section STATUS JSON.

mod render;
mod update;

pub use render::{human_bytes, human_duration, render_table, render_warnings};
pub use update::{LastUpdate, UpdateInfo};

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{self, Service};
use crate::os::inner::{ManagerProxy, UnitProxy};
use crate::os::live::{self, LiveState, Phase};

/// Overlay fill at which `status` and the start warn.
pub const OVERLAY_WARN_PERCENT: f64 = 90.0;

/// `schema_version` of every `status --json` object: raised when a field changes meaning
/// or goes away (a new field does not raise it).
pub const SCHEMA_VERSION: u32 = 1;

/// How long one D-Bus question may take before the answer is `unknown`.
const BUS_TIMEOUT: Duration = Duration::from_secs(1);

/// The host unit running a service.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostUnit {
    /// `ood001.service` (generated) or `apptainer-supervisor@ood001.service` (template).
    pub name: String,
    pub active_state: String,
    pub sub_state: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OverlayUse {
    pub path: PathBuf,
    /// The image's size as `ls -l` shows it (sparse: mostly holes).
    pub apparent_bytes: u64,
    /// Blocks the image really occupies on the host filesystem (`du`).
    pub allocated_bytes: u64,
    /// Used blocks of the ext3 filesystem inside, from its superblock.
    pub fs_used_percent: Option<f64>,
    pub fs_size_bytes: Option<u64>,
    /// Why the filesystem could not be read (missing image, not ext3 …).
    pub fs_error: Option<String>,
    /// Its lock (issue 16): `free`, `held by HOST (supervisor pid, unit, boot, since)`,
    /// `held, holder unknown …` or `unknown: …`; None when the image is missing.
    pub lock: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub url: Option<String>,
    /// Unix time of the image file's last modification (pull); None when missing.
    pub mtime: Option<u64>,
    pub age_days: Option<u64>,
    /// `sha256:<64 hex>` of the image the service file's pointer names now (what the next
    /// start runs), read from its name; None when the image is not a managed pointer.
    pub digest: Option<String>,
    /// `sha256:<64 hex>` of the image the running supervisor started, from its live state
    /// file; None when not running or unmanaged at its start.
    pub running_digest: Option<String>,
}

impl ImageInfo {
    /// The digest `status` shows: what runs while it runs, else what the next start runs.
    pub fn shown_digest(&self) -> Option<&str> {
        self.running_digest.as_deref().or(self.digest.as_deref())
    }
}

/// One row of `status`, and one object of `status --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceStatus {
    /// [`SCHEMA_VERSION`], so that scripts can tell which fields they read.
    pub schema_version: u32,
    pub service: String,
    /// The service file (None: only a state file exists, the service file is gone).
    pub config: Option<PathBuf>,
    pub config_error: Option<String>,
    /// None when the host's systemd could not be asked (the `unknown` column).
    pub unit: Option<HostUnit>,
    /// The supervisor's phase; `stale` when its state file outlived it; `not-running` when
    /// there is no state file.
    pub phase: String,
    pub stale: bool,
    pub status: Option<String>,
    pub instance_pid: Option<i32>,
    pub ip: Option<String>,
    pub uptime_sec: Option<u64>,
    pub inner_state: Option<String>,
    /// Failed units inside: asked live when possible (`inner_failed_live`), else the
    /// required units the supervisor last saw failed.
    pub failed_units: Vec<String>,
    pub inner_failed_live: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
    pub exit_code: Option<i32>,
    pub overlay: Option<OverlayUse>,
    pub image: Option<ImageInfo>,
    /// The updates of a managed image (None for an unmanaged one, or no service file).
    pub update: Option<UpdateInfo>,
    pub warnings: Vec<String>,
}

impl ServiceStatus {
    /// Ready (or degraded but running) and not stale.
    pub fn is_up(&self) -> bool {
        !self.stale && matches!(self.phase.as_str(), "ready" | "degraded")
    }
}

/// Whether a named service exists at all: a service file, or a state file of a supervisor
/// (a service removed while it still runs). `status NAME` of neither is an error.
pub fn known(config_dir: &Path, run_dir: &Path, name: &str) -> bool {
    config::path_for(config_dir, name).is_ok_and(|p| p.exists())
        || live::path(run_dir, name).exists()
}

/// The services to show: the named ones, or every `*.toml` of the config directory plus any
/// state file without a service file (a service removed while it still runs).
pub fn service_names(
    config_dir: &Path,
    run_dir: &Path,
    named: &[String],
) -> Result<Vec<String>, String> {
    if !named.is_empty() {
        for n in named {
            config::path_for(config_dir, n).map_err(|r| format!("service name {r}"))?;
        }
        return Ok(named.to_vec());
    }
    let mut names = std::collections::BTreeSet::new();
    let mut add_from = |dir: &Path, ext: &str| {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().and_then(|x| x.to_str()) == Some(ext) {
                    if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                        if !stem.starts_with('.') && config::path_for(config_dir, stem).is_ok() {
                            names.insert(stem.to_owned());
                        }
                    }
                }
            }
        }
    };
    add_from(config_dir, "toml");
    add_from(run_dir, "json");
    Ok(names.into_iter().collect())
}

/// Everything about one service that can be known without asking a bus.
pub fn collect_local(config_dir: &Path, run_dir: &Path, name: &str) -> ServiceStatus {
    let cfg_path = config::path_for(config_dir, name).ok();
    let (service, config_error, config) = match &cfg_path {
        Some(p) if p.exists() => match config::load(p, Some(name)) {
            Ok(s) => (Some(s), None, Some(p.clone())),
            Err(e) => (None, Some(e.to_string()), Some(p.clone())),
        },
        _ => (None, None, None),
    };
    let live = LiveState::read(&live::path(run_dir, name));
    let mut st = ServiceStatus {
        schema_version: SCHEMA_VERSION,
        service: name.to_owned(),
        config,
        config_error,
        unit: None,
        phase: "not-running".into(),
        stale: false,
        status: None,
        instance_pid: None,
        ip: None,
        uptime_sec: None,
        inner_state: None,
        failed_units: Vec::new(),
        inner_failed_live: false,
        restarts: 0,
        last_error: None,
        exit_code: None,
        overlay: None,
        image: None,
        update: None,
        warnings: Vec::new(),
    };
    let mut running_digest = None;
    match live {
        Ok(Some(l)) => {
            apply_live(&mut st, &l, live::unix_now());
            if st.instance_pid.is_some() {
                running_digest = l.image_digest.clone();
            }
        }
        Ok(None) => {}
        Err(e) => st.warnings.push(e.to_string()),
    }
    if let Some(e) = &st.config_error {
        st.warnings.push(format!("service file: {}", first_line(e)));
    }
    if st.config.is_none() {
        st.warnings
            .push("no service file in the config directory".to_owned());
    }
    // A unit of the same name outranks or is shadowed by ours: say so, on one line.
    if let Some(c) = crate::host::unit_names::clash(name, &crate::host::unit_names::unit_root()) {
        st.warnings
            .push(c.message(name).replace("\n  hint: ", "; "));
    }
    if let Some(s) = &service {
        st.overlay = Some(overlay_use(&s.overlay.path));
        let source =
            crate::host::image_pointer::classify(&s.image, &crate::host::canonical_path(&s.image));
        st.update = update::info(&source, &s.overlay.path);
        if let Some(u) = &st.update {
            st.warnings.extend(update::warnings(u, live::unix_now()));
        }
        let mut i = image_info(s, &source);
        i.running_digest = running_digest;
        if let (Some(now), Some(runs)) = (&i.digest, &i.running_digest) {
            if now != runs {
                st.warnings.push(format!(
                    "the image pointer now names {}; the running instance keeps {} until the next start",
                    crate::host::image_pointer::short_digest(now),
                    crate::host::image_pointer::short_digest(runs)
                ));
            }
        }
        st.image = Some(i);
    }
    if let Some(o) = &st.overlay {
        // Held while the service runs here is its own claim; held otherwise is someone
        // else (another host, a hand-started Apptainer): a start here would be refused.
        let here = matches!(
            st.phase.as_str(),
            "starting"
                | "creating-overlay"
                | "starting-instance"
                | "booting"
                | "ready"
                | "degraded"
                | "stopping"
        );
        if let Some(l) = &o.lock {
            if (l.starts_with("held") && !here) || l.starts_with("unknown") {
                st.warnings
                    .push(format!("overlay {}: {l}", o.path.display()));
            }
        }
        if let Some(p) = o.fs_used_percent {
            if p >= OVERLAY_WARN_PERCENT {
                st.warnings.push(format!(
                    "overlay {} is {p:.0}% full (warning at {OVERLAY_WARN_PERCENT:.0}%)",
                    o.path.display()
                ));
            }
        }
    }
    st
}

/// Folds the supervisor's live state into a row. `now`: unix seconds (a parameter so that
/// the uptime is testable).
pub fn apply_live(st: &mut ServiceStatus, l: &LiveState, now: u64) {
    st.stale = l.is_stale();
    st.phase = if st.stale {
        "stale".to_owned()
    } else {
        l.phase.as_str().to_owned()
    };
    st.status = Some(l.status.clone()).filter(|s| !s.is_empty());
    st.restarts = l.restarts;
    st.last_error = l.last_error.clone();
    st.exit_code = l.exit_code;
    for w in &l.warnings {
        st.warnings.push(format!("at start: {}", first_line(w)));
    }
    if st.stale {
        st.warnings.push(format!(
            "stale state file: its supervisor (pid {}) is gone; it last said {} ({})",
            l.supervisor.map_or(0, |p| p.pid),
            l.phase.as_str(),
            l.status
        ));
        return;
    }
    let running = matches!(
        l.phase,
        Phase::Booting | Phase::Ready | Phase::Degraded | Phase::Stopping
    );
    if running {
        st.instance_pid = l.instance.map(|p| p.pid);
        st.ip = Some(l.ip.clone()).filter(|s| !s.is_empty());
        st.uptime_sec = l.started_at.map(|t| now.saturating_sub(t));
        if let Some(i) = &l.inner {
            st.inner_state = Some(i.system_state.clone()).filter(|s| !s.is_empty());
            st.failed_units = i.failed_units.clone();
        }
    }
    if l.phase == Phase::Failed {
        if let Some(e) = &l.last_error {
            st.warnings
                .push(format!("last run failed: {}", first_line(e)));
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

pub fn overlay_use(path: &Path) -> OverlayUse {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path);
    let (apparent, allocated) = meta
        .as_ref()
        .map_or((0, 0), |m| (m.len(), m.blocks() * 512));
    let (fs_used_percent, fs_size_bytes, fs_error) =
        match crate::host::overlay::read_superblock(path) {
            Ok(sb) => (
                Some((sb.fill_percent() * 10.0).round() / 10.0),
                Some(sb.blocks_count * sb.block_size),
                None,
            ),
            Err(e) => (None, None, Some(e.to_string())),
        };
    OverlayUse {
        path: path.to_owned(),
        apparent_bytes: apparent,
        allocated_bytes: allocated,
        fs_used_percent,
        fs_size_bytes,
        fs_error,
        lock: crate::host::overlay_lock::describe(path, Duration::from_secs(2)),
    }
}

fn image_info(s: &Service, source: &crate::host::image_pointer::ImageSource) -> ImageInfo {
    let mtime = std::fs::metadata(&s.image)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    ImageInfo {
        path: s.image.clone(),
        url: s.image_url.clone(),
        mtime,
        age_days: mtime.map(|t| live::unix_now().saturating_sub(t) / 86_400),
        // From the name only (never hashed): see apptainer-supervisor(8), IMAGE POINTER.
        digest: source.digest().map(str::to_owned),
        running_digest: None,
    }
}

/// Asks the host's systemd (system bus; `DBUS_SYSTEM_BUS_ADDRESS` is honoured) which unit
/// runs each service, and the container's systemd for its failed units. Bounded: no bus or
/// no answer leaves the fields empty.
pub async fn ask_buses(rows: &mut [ServiceStatus]) {
    let host = tokio::time::timeout(BUS_TIMEOUT, async {
        let conn = zbus::connection::Builder::system().build().await?;
        ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
    })
    .await;
    let host = match host {
        Ok(Ok(m)) => Some(m),
        _ => None,
    };
    for row in rows.iter_mut() {
        if let Some(m) = &host {
            row.unit = tokio::time::timeout(BUS_TIMEOUT, host_unit(m, &row.service))
                .await
                .ok()
                .flatten();
        }
        if let Some(pid) = row.instance_pid {
            let live = tokio::time::timeout(BUS_TIMEOUT, async {
                let i = crate::os::inner::connect_now(pid).await?;
                i.failed_units().await
            })
            .await;
            match live {
                Ok(Ok(failed)) => {
                    row.failed_units = failed;
                    row.inner_failed_live = true;
                }
                // A bus that is not the container's is worth saying; no permission (not
                // root) or no answer in time leaves the last known failed units.
                Ok(Err(e)) if e.is_refusal() => row
                    .warnings
                    .push(format!("the container's systemd was not asked: {e}")),
                _ => {}
            }
        }
        if !row.failed_units.is_empty() {
            row.warnings.push(format!(
                "failed units inside: {}",
                row.failed_units.join(", ")
            ));
        }
    }
}

/// The loaded unit of a service: the generated `NAME.service` or the template instance,
/// preferring whichever is active (they conflict, so at most one is).
async fn host_unit(m: &ManagerProxy<'_>, name: &str) -> Option<HostUnit> {
    let conn = m.inner().connection();
    let mut seen = Vec::new();
    for unit in [
        format!("{name}.service"),
        format!("apptainer-supervisor@{name}.service"),
    ] {
        let Ok(path) = m.get_unit(&unit).await else {
            continue;
        };
        let u = UnitProxy::builder(conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .ok()?;
        let h = HostUnit {
            name: unit,
            active_state: u.active_state().await.ok()?,
            sub_state: u.sub_state().await.ok()?,
        };
        if h.active_state != "inactive" {
            return Some(h);
        }
        seen.push(h);
    }
    Some(seen.into_iter().next().unwrap_or(HostUnit {
        name: format!("{name}.service"),
        active_state: "not-loaded".into(),
        sub_state: String::new(),
    }))
}

/// Gathers every row: local files first, then the buses (one current-thread runtime).
pub fn collect(config_dir: &Path, run_dir: &Path, names: &[String]) -> Vec<ServiceStatus> {
    let mut rows: Vec<ServiceStatus> = names
        .iter()
        .map(|n| collect_local(config_dir, run_dir, n))
        .collect();
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        rt.block_on(ask_buses(&mut rows));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::instance::ProcId;
    use crate::os::live::{InnerSummary, LiveState};

    fn row(name: &str) -> ServiceStatus {
        ServiceStatus {
            schema_version: SCHEMA_VERSION,
            service: name.into(),
            config: None,
            config_error: None,
            unit: None,
            phase: "not-running".into(),
            stale: false,
            status: None,
            instance_pid: None,
            ip: None,
            uptime_sec: None,
            inner_state: None,
            failed_units: vec![],
            inner_failed_live: false,
            restarts: 0,
            last_error: None,
            exit_code: None,
            overlay: None,
            image: None,
            update: None,
            warnings: vec![],
        }
    }

    fn me() -> Option<ProcId> {
        ProcId::of(std::process::id() as i32)
    }

    #[test]
    fn a_live_ready_service_shows_pid_ip_uptime_and_inner_state() {
        let mut r = row("ood001");
        let l = LiveState {
            phase: Phase::Ready,
            supervisor: me(),
            instance: me(),
            ip: "10.0.0.2".into(),
            started_at: Some(1000),
            inner: Some(InnerSummary {
                system_state: "running".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        apply_live(&mut r, &l, 1000 + 3 * 3600 + 65);
        assert_eq!(r.phase, "ready");
        assert!(r.is_up());
        assert_eq!(r.instance_pid, Some(std::process::id() as i32));
        assert_eq!(r.ip.as_deref(), Some("10.0.0.2"));
        assert_eq!(r.uptime_sec.map(human_duration).as_deref(), Some("3h01m"));
        assert_eq!(r.inner_state.as_deref(), Some("running"));
    }

    #[test]
    fn a_stale_file_is_never_shown_as_running() {
        let mut r = row("login005");
        let l = LiveState {
            phase: Phase::Ready,
            status: "running".into(),
            supervisor: Some(ProcId {
                pid: 1,
                start_time: u64::MAX,
            }),
            instance: Some(ProcId {
                pid: 4242,
                start_time: 1,
            }),
            ip: "10.0.0.9".into(),
            started_at: Some(1),
            ..Default::default()
        };
        apply_live(&mut r, &l, 100);
        assert_eq!(r.phase, "stale");
        assert!(!r.is_up());
        assert_eq!(r.instance_pid, None);
        assert_eq!(r.ip, None);
        assert!(
            r.warnings[0].starts_with("stale state file"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn the_table_says_unknown_without_a_host_bus_and_lists_warnings() {
        let mut r = row("ww001");
        r.phase = "ready".into();
        r.overlay = Some(OverlayUse {
            path: "/x/overlay.img".into(),
            lock: None,
            apparent_bytes: 100_000 * 1024 * 1024,
            allocated_bytes: 3 * 1024 * 1024 * 1024,
            fs_used_percent: Some(93.0),
            fs_size_bytes: None,
            fs_error: None,
        });
        r.warnings.push("overlay /x/overlay.img is 93% full".into());
        let t = render_table(std::slice::from_ref(&r), true) + &render_warnings(&[r.clone()]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SERVICE  UNIT     PHASE"), "{t}");
        assert!(lines[1].starts_with("ww001    unknown  ready"), "{t}");
        assert!(lines[1].contains("93% 3.0G/98G"), "{t}");
        assert_eq!(
            lines[2],
            "warning: ww001: overlay /x/overlay.img is 93% full"
        );
    }

    #[test]
    fn no_legend_leaves_out_the_header_only() {
        let r = row("ood001");
        let t = render_table(std::slice::from_ref(&r), false);
        assert_eq!(t.lines().count(), 1, "{t}");
        // The same columns as with the header, so both forms line up the same.
        assert!(t.starts_with("ood001   unknown  not-running"), "{t}");
    }

    #[test]
    fn sizes_and_durations_read_like_ls_and_ps() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(100_000 * 1024 * 1024), "98G");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(61), "1m01s");
        assert_eq!(human_duration(2 * 86_400 + 3 * 3600), "2d3h");
    }

    /// What a hostile container could put in a row, had it passed the checks at ingress:
    /// the table (with and without legend), the warnings and the JSON stay one line per row
    /// with no control character.
    #[test]
    fn container_text_never_forges_a_row_or_reaches_the_terminal_raw() {
        let mut r = row("ood001");
        r.phase = "ready".into();
        r.inner_state = Some("running\u{1b}[2J".into());
        r.failed_units = vec![
            "a.service\nood002   active   ready".into(),
            "b\tc.service\u{9b}31m".into(),
        ];
        r.warnings
            .push("failed units inside: x.service\nwarning: forged".into());
        let rows = [r.clone(), row("ood002")];
        for legend in [true, false] {
            let t = render_table(&rows, legend) + &render_warnings(&rows);
            assert_eq!(t.lines().count(), 2 + usize::from(legend) + 1, "{t}");
            assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
            assert!(t.contains("a.service\\nood002"), "{t}");
            assert!(t.contains("running\\x1b[2J"), "{t}");
        }
        let json = serde_json::to_string(&rows).unwrap();
        assert!(!json.chars().any(|c| (c as u32) < 0x20), "{json}");
    }
}
