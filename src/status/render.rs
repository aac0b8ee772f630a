//! `status` as a table for people: sizes and durations as `ls -h` and `ps` write them,
//! the warnings after the table. Every cell and warning is written on one line with control
//! characters escaped (`sanitize::one_line`): what came from a container was checked when it
//! was read, and this is the last guard, so no text can forge a row or reach the terminal
//! as an escape sequence.

use super::*;
use crate::os::sanitize::one_line;

/// The longest cell or warning written; a cell is a word or two, a warning a sentence.
const MAX_CELL: usize = 1024;

/// `1.2G`-style sizes for the table.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else if v < 10.0 {
        format!("{v:.1}{}", UNITS[i])
    } else {
        format!("{v:.0}{}", UNITS[i])
    }
}

/// `3d4h`, `2h05m`, `4m10s`.
pub fn human_duration(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// The table: the header line when `legend` (`--no-legend` leaves it out, as systemctl's
/// does), then one line per service. Warnings are [`render_warnings`].
pub fn render_table(rows: &[ServiceStatus], legend: bool) -> String {
    let header = [
        "SERVICE", "UNIT", "PHASE", "PID", "IP", "UPTIME", "INNER", "FAILED", "OVERLAY", "IMAGE",
    ];
    let dash = || "-".to_owned();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let row = vec![
                r.service.clone(),
                r.unit.as_ref().map_or_else(
                    || "unknown".to_owned(),
                    |u| {
                        if u.name.starts_with("apptainer-supervisor@") {
                            format!("{} (@)", u.active_state)
                        } else {
                            u.active_state.clone()
                        }
                    },
                ),
                r.phase.clone(),
                r.instance_pid.map_or_else(dash, |p| p.to_string()),
                r.ip.clone().unwrap_or_else(dash),
                r.uptime_sec.map_or_else(dash, human_duration),
                r.inner_state.clone().unwrap_or_else(dash),
                if r.failed_units.is_empty() {
                    if r.inner_state.is_some() {
                        "0".to_owned()
                    } else {
                        dash()
                    }
                } else {
                    r.failed_units.join(",")
                },
                r.overlay.as_ref().map_or_else(dash, |o| {
                    let fill = o
                        .fs_used_percent
                        .map_or_else(|| "?%".to_owned(), |p| format!("{p:.0}%"));
                    format!(
                        "{fill} {}/{}",
                        human_bytes(o.allocated_bytes),
                        human_bytes(o.apparent_bytes)
                    )
                }),
                // The short digest of a managed image and the age of its file ("-"
                // for the digest of an unmanaged one: `update` cannot switch it).
                r.image.as_ref().map_or_else(dash, |i| {
                    let digest = i
                        .shown_digest()
                        .map_or("-", crate::host::image_pointer::short_digest);
                    match i.age_days {
                        Some(d) => format!("{digest} {d}d"),
                        None => format!("{digest} missing"),
                    }
                }),
            ];
            row.into_iter()
                .map(|c| one_line(&c, MAX_CELL).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String]| {
        let last = row.len() - 1;
        for (i, c) in row.iter().enumerate() {
            out.push_str(c);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    if legend {
        line(
            &mut out,
            &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        );
    }
    for row in &cells {
        line(&mut out, row);
    }
    out
}

/// One `warning: SERVICE: …` line per warning.
pub fn render_warnings(rows: &[ServiceStatus]) -> String {
    let mut out = String::new();
    for r in rows {
        for w in &r.warnings {
            let line = format!("warning: {}: {w}", r.service);
            out.push_str(&one_line(&line, MAX_CELL));
            out.push('\n');
        }
    }
    out
}
