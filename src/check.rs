//! `check`: the plan `run` would carry out, printed, without doing any of it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::apptainer::InstancePaths;
use crate::argv;
use crate::config::Service;
use crate::instance::RunRecord;

/// A file `run` creates or uses.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PlannedFile {
    pub path: PathBuf,
    pub what: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Plan {
    pub name: String,
    pub file: PathBuf,
    /// The exact argv of `apptainer instance start`, argv[0] included.
    pub argv: Vec<String>,
    /// argv of `apptainer overlay create`, run only when the overlay is missing.
    pub overlay_create: Vec<String>,
    pub files: Vec<PlannedFile>,
    /// The conflists `run` writes, by network name, as JSON.
    pub conflists: std::collections::BTreeMap<String, serde_json::Value>,
    pub host_checked: bool,
    /// Settings that are read but do nothing (`security.keep_capabilities`), with why.
    pub warnings: Vec<String>,
}

fn strings(v: Vec<std::ffi::OsString>) -> Vec<String> {
    v.into_iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect()
}

pub fn plan(s: &Service, run_dir: &Path, paths: &InstancePaths, host_checked: bool) -> Plan {
    Plan {
        name: s.name.clone(),
        file: s.file.clone(),
        argv: strings(argv::instance_start(s)),
        overlay_create: strings(argv::overlay_create(s, &s.overlay.path)),
        files: s
            .networks
            .iter()
            .map(|n| match n.cni {
                Some(_) => PlannedFile {
                    path: crate::network::path(&s.apptainer.network_dir, &n.name),
                    what: "CNI conflist: written when its content changes, never over a file we did not write",
                },
                // Found by its "name" field, whatever its file name (libcni LoadConfList).
                None => PlannedFile {
                    path: s.apptainer.network_dir.clone(),
                    what: "CNI conflist of an external network (--network), found here by its \"name\": must exist, never written; its lease is released if the master dies",
                },
            })
            .chain([
            PlannedFile {
                path: s.overlay.path.clone(),
                what: "overlay image: created if missing, never modified or removed",
            },
            PlannedFile {
                path: run_dir.join(format!("{}.lock", s.name)),
                what: "lock held while the supervisor runs",
            },
            PlannedFile {
                path: RunRecord::path(run_dir, &s.name),
                what: "run record: container and master pid with start times",
            },
            PlannedFile {
                path: paths.state_file.clone(),
                what:
                    "Apptainer's instance state file (written by Apptainer, read here, never moved)",
            },
            PlannedFile {
                path: paths.err_log.clone(),
                what: "Apptainer's instance stderr log",
            },
            ])
            .collect(),
        conflists: s
            .networks
            .iter()
            .filter_map(|n| {
                n.cni.as_ref().map(|c| {
                    let text = crate::network::render(&s.name, n, c);
                    (n.name.clone(), serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
                })
            })
            .collect(),
        host_checked,
        warnings: crate::privilege::keep_capabilities_notice(s)
            .into_iter()
            .collect(),
    }
}

/// Quotes one argument for display only (the argv is never run through a shell).
fn quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-,:=+@%".contains(c))
    {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// `--flag value` pairs on one line each, for reading; the first three words together.
fn group_flags(argv: &[String]) -> Vec<String> {
    let mut lines = vec![argv
        .iter()
        .take(3)
        .map(|a| quote(a))
        .collect::<Vec<_>>()
        .join(" ")];
    let mut rest = argv.iter().skip(3).peekable();
    while let Some(a) = rest.next() {
        let mut line = quote(a);
        if a.starts_with("--") {
            if let Some(v) = rest.next_if(|v| !v.starts_with('-')) {
                line = format!("{line} {}", quote(v));
            }
        }
        lines.push(line);
    }
    lines
}

pub fn render_text(p: &Plan) -> String {
    let mut out = format!("{}: service {} is valid", p.file.display(), p.name);
    out.push_str(if p.host_checked {
        " (host checked)\n"
    } else {
        " (static check; --host checks this host too)\n"
    });
    for w in &p.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out.push_str("\ninstance start (argv, no shell):\n  ");
    out.push_str(&group_flags(&p.argv).join(" \\\n    "));
    out.push_str("\n\noverlay create, only when the image is missing:\n  ");
    out.push_str(
        &p.overlay_create
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    );
    for (name, c) in &p.conflists {
        out.push_str(&format!(
            "\n\nconflist {name}:\n{}",
            serde_json::to_string_pretty(c).unwrap_or_default()
        ));
    }
    out.push_str("\n\nfiles:\n");
    for f in &p.files {
        out.push_str(&format!("  {}\n      {}\n", f.path.display(), f.what));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_is_for_display() {
        assert_eq!(quote("/a/b:/c"), "/a/b:/c");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }
}
