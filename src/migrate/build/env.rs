//! `env_file`: the file start.sh sources, as the service file's env_file (said in a
//! comment when it is the default), and what becomes of each variable `.service_env`
//! holds — read here, never sourced.

use super::Read;
use crate::config::{self, DEFAULT_ENV_FILE};
use crate::migrate::{Input, Level, Model, Note, Origin, Setting};

/// Sets `m.env_file` or `m.env_file_note` when start.sh sources a file; `service_env` is
/// that file's text, when it lay beside start.sh.
pub(super) fn env_file(m: &mut Model, read: &Read, service_env: Option<&Input>) {
    let sh = &read.sh;
    if let Some(src) = sh.as_ref().and_then(|s| s.env_source.clone()) {
        let mut note = Setting::new((), src.at.clone());
        note.notes.extend(src.notes.iter().cloned());
        if src.path == DEFAULT_ENV_FILE && src.guarded {
            note.notes.push(Note {
                level: Level::Note,
                at: src.at.clone(),
                text: format!(
                    "start.sh sources {} when it exists: that is env_file's default, read as \
                     KEY=VALUE lines, never run by a shell",
                    src.path
                ),
            });
            m.env_file_note = Some(note);
        } else {
            let mut s = Setting::new(src.path.clone(), src.at.clone());
            s.notes.extend(src.notes.iter().cloned());
            if src.guarded {
                s.notes.push(Note {
                    level: Level::Warning,
                    at: src.at.clone(),
                    text: "start.sh sourced it only when it existed; a set env_file must exist"
                        .into(),
                });
            }
            m.env_file = Some(s);
        }
        if let Some(env) = service_env {
            let target = m.env_file.as_mut().map_or_else(
                || &mut m.env_file_note.as_mut().expect("set above").notes,
                |s| &mut s.notes,
            );
            let allexport = sh.as_ref().is_some_and(|s| s.allexport);
            target.extend(service_env_notes(env, allexport));
        }
    }
}

/// What becomes of each variable of `.service_env` (read, never sourced).
fn service_env_notes(env: &Input, allexport: bool) -> Vec<Note> {
    let label = env.label();
    let vars = match config::parse_env_file(&env.text) {
        Ok(v) => v,
        Err((line, reason)) => {
            return vec![Note {
                level: Level::Warning,
                at: Origin { file: label, line },
                text: format!(
                    "{reason}: the supervisor reads this file as KEY=VALUE lines and will refuse it as it is"
                ),
            }]
        }
    };
    let mut out = Vec::new();
    for (key, _) in vars {
        let line = env
            .text
            .lines()
            .position(|l| {
                let t = l.trim_start();
                let t = t.strip_prefix("export ").map_or(t, str::trim_start);
                t.starts_with(&format!("{key}="))
            })
            .map_or(0, |i| i + 1);
        let exported = line > 0
            && env
                .text
                .lines()
                .nth(line - 1)
                .is_some_and(|l| l.trim_start().starts_with("export "));
        let at = Origin {
            file: label.clone(),
            line,
        };
        if !exported && !allexport {
            out.push(Note {
                level: Level::Warning,
                at: at.clone(),
                text: format!(
                    "{key}: start.sh's `source` made it a shell variable only (no export), so \
                     apptainer never saw it; the supervisor puts it into apptainer's environment"
                ),
            });
        }
        // Apptainer reads APPTAINER_*/SINGULARITY_* itself and turns APPTAINERENV_X into
        // X inside; everything else only reaches the --boot init's environment.
        if !key.starts_with("APPTAINER") && !key.starts_with("SINGULARITY") {
            out.push(Note {
                level: Level::Warning,
                at,
                text: format!(
                    "{key}: reaches the container's init, but with --boot that is systemd, which \
                     starts its units with a clean environment (systemd src/core/manager.c, \
                     manager_default_environment), so no service inside sees it; set it in the \
                     image (a unit's Environment=) instead"
                ),
            });
        }
    }
    out
}
