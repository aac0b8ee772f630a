//! Judging the new image: its start (the job's result, and that it is this start, on
//! this image) and then its probation, in which the unit must stay up for
//! `update.probation_sec`. Woken by every change of the unit (the supervisor's STATUS=
//! changes with the inner state), not by polling.

use std::path::Path;
use std::time::{Duration, Instant};

use super::interrupt::Interrupt;
use crate::os::host_systemd::{HostSystemd, UnitState};
use crate::os::live::LiveState;

/// What the start of the new image is judged against: the unit before the update stopped
/// it, and its restart count once the start job was queued (after `ResetFailedUnit`).
pub(super) struct Before {
    pub invocation_id: Vec<u8>,
    pub n_restarts: u32,
}

/// The start's verdict, from the job's result and the unit's state after it: `done`,
/// active, a new invocation (a start made meanwhile by someone else would be the old
/// image's run), no restart by systemd inside the job (a first boot that failed and an
/// automatic restart that came up is not a good start: the failed boot wrote into the
/// overlay), and the supervisor's live state saying it is this run on this image.
pub(super) fn judge_start(
    unit: &str,
    job: &str,
    st: Option<&UnitState>,
    before: &Before,
    live_path: &Path,
    to: &str,
) -> Result<(), String> {
    let Some(st) = st.filter(|st| job == "done" && st.active_state == "active") else {
        return Err(start_failed(unit, job, st, live_path));
    };
    if st.invocation_id == before.invocation_id {
        return Err(format!(
            "{unit} is active but not from this start (the same invocation as before the update): was it started by someone else meanwhile?"
        ));
    }
    if st.n_restarts != before.n_restarts {
        return Err(format!(
            "{unit} came up only after {} automatic restart(s) of the new image{}",
            st.n_restarts - before.n_restarts,
            last_error(live_path).map_or_else(String::new, |e| format!("; first: {e}"))
        ));
    }
    this_run(st, live_path, to).map(|_| ())
}

/// The supervisor's live state, if it is this run's (its pid is the unit's MainPID) on
/// the new image; else why not.
fn this_run(st: &UnitState, live_path: &Path, to: &str) -> Result<LiveState, String> {
    let l = match LiveState::read(live_path) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(format!(
                "no live state of the supervisor at {} (is --run-dir the unit's RuntimeDirectory?)",
                live_path.display()
            ))
        }
        Err(e) => return Err(format!("reading {}: {e}", live_path.display())),
    };
    if l.supervisor.map(|p| p.pid) != i32::try_from(st.main_pid).ok() {
        return Err(format!(
            "the live state at {} is not the unit's supervisor's (MainPID {})",
            live_path.display(),
            st.main_pid
        ));
    }
    if l.image_digest.as_deref() != Some(to) {
        return Err(format!(
            "the unit runs {}, not {to}",
            l.image_digest
                .as_deref()
                .unwrap_or("an image without a digest")
        ));
    }
    Ok(l)
}

fn last_error(live_path: &Path) -> Option<String> {
    LiveState::read(live_path).ok().flatten()?.last_error
}

/// Why a start of the new image failed, in words: the supervisor's own last error (its live
/// state file, e.g. "required unit asv-slow.service failed (exit-code)"), else the unit's
/// state and STATUS= text.
fn start_failed(unit: &str, job: &str, st: Option<&UnitState>, live_path: &Path) -> String {
    let mut s = format!("the start of {unit} ended with job result `{job}`");
    if let Some(e) = last_error(live_path) {
        s.push_str(&format!(": {e}"));
    } else if let Some(st) = st {
        s.push_str(&format!(
            ", the unit {}/{} (Result={})",
            st.active_state, st.sub_state, st.result
        ));
        if !st.status_text.is_empty() {
            s.push_str(&format!(", status: {}", st.status_text));
        }
    }
    s
}

/// The new image on probation: the unit must stay active, in the same invocation, with no
/// restart by systemd and none of a required unit by the supervisor, and no required unit
/// failed inside, for `within`.
pub(super) async fn probation(
    host: &HostSystemd,
    unit: &str,
    live_path: &Path,
    to: &str,
    within: Duration,
    intr: &Interrupt,
) -> Result<(), String> {
    let mut watch = host.watch(unit).await.map_err(|e| e.to_string())?;
    let first = state(host, unit).await?;
    let restarts0 = this_run(&first, live_path, to)?.restarts;
    let deadline = Instant::now() + within;
    loop {
        let st = state(host, unit).await?;
        if st.active_state != "active"
            || st.invocation_id != first.invocation_id
            || st.n_restarts != first.n_restarts
        {
            return Err(format!(
                "{unit} did not stay up during the probation: {}/{} (Result={}){}",
                st.active_state,
                st.sub_state,
                st.result,
                if st.status_text.is_empty() {
                    String::new()
                } else {
                    format!(", status: {}", st.status_text)
                }
            ));
        }
        let l = this_run(&st, live_path, to)?;
        if let Some(inner) = &l.inner {
            if !inner.failed_units.is_empty() {
                return Err(format!(
                    "required units failed inside during the probation: {}",
                    inner.failed_units.join(", ")
                ));
            }
        }
        if l.restarts > restarts0 {
            return Err(format!(
                "the supervisor restarted a failed required unit during the probation ({} restarts)",
                l.restarts - restarts0
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        if intr.or(watch.changed(left)).await.is_none() {
            return Err("interrupted during the probation".to_owned());
        }
    }
}

async fn state(host: &HostSystemd, unit: &str) -> Result<UnitState, String> {
    host.state(unit)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{unit} is no longer loaded"))
}
