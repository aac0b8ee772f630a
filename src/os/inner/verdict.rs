//! Readiness and the `STATUS=` line, a pure function of the inner state (the policy calls
//! it; tables below).

use super::{is_booted_state, InnerState, UnitState};

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
    use super::super::fixtures::{state, unit};
    use super::*;

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
}
