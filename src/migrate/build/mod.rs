//! The read inputs merged into one [`Model`], one step per part of the service file.
//!
//! start.sh wins where both inputs speak, because it is what actually ran; each step
//! that sees the two disagree says so in a note next to the setting it builds. The steps,
//! in the order [`build`] runs them (which is also the order their notes reach the
//! operator): [`identity`] the service directory, name, image and boot; the binds here;
//! [`network`] the `[[network]]` tables; [`overlay`]; [`env`] the env file and what
//! `.service_env` holds; then what start.sh passes through as is, and the readiness note.
//! Errors come in input order: host_vars' syntax, the service directory, start.sh's
//! syntax, the name.

mod env;
mod identity;
mod network;
mod overlay;

use crate::config::{DEFAULT_OVERLAY, DEFAULT_OVERLAY_MIB};
use crate::migrate::start_sh::{self, StartSh};
use crate::migrate::yaml::{self, HostVars};
use crate::migrate::{Input, Inputs, Level, MigrateError, Model, Note, Origin, Setting};

/// What the inputs say once read, and the labels their notes carry (a file name, so the
/// output does not depend on where the inputs lay).
struct Read {
    sh: Option<StartSh>,
    hv: Option<HostVars>,
    sh_label: String,
    hv_label: String,
}

/// Reads the inputs and builds the model; the caller renders and validates it.
pub(super) fn build(inputs: &Inputs) -> Result<Model, MigrateError> {
    if inputs.start_sh.is_none() && inputs.host_vars.is_none() {
        return Err(MigrateError::Usage(
            "nothing to migrate".into(),
            "pass --start-sh PATH and/or --host-vars PATH",
        ));
    }
    let hv = match &inputs.host_vars {
        Some(i) => {
            Some(yaml::read(&i.text, &i.label()).map_err(|e| parse_err(i, e.line, e.reason))?)
        }
        None => None,
    };
    // start.sh's reader needs the directory `$DIRNAME` stands for, so the service
    // directory is settled before start.sh is read.
    let service_dir = identity::service_dir(inputs, hv.as_ref())?;
    let sh = match &inputs.start_sh {
        Some(i) => Some(
            start_sh::read(&i.text, &i.label(), &service_dir.value)
                .map_err(|e| parse_err(i, e.line, e.reason))?,
        ),
        None => None,
    };
    let label = |i: &Option<Input>| i.as_ref().map(Input::label).unwrap_or_default();
    let read = Read {
        sh,
        hv,
        sh_label: label(&inputs.start_sh),
        hv_label: label(&inputs.host_vars),
    };
    let notes = identity::layout_notes(inputs, &read);
    let name = identity::name(inputs, &read)?;

    let mut m = Model {
        inputs: [&inputs.start_sh, &inputs.host_vars]
            .into_iter()
            .flatten()
            .map(Input::label)
            .collect(),
        notes,
        name,
        service_dir,
        image: None,
        image_url: read.hv.as_ref().and_then(|h| h.container_url.clone()),
        boot: Setting::bare(true),
        hostname: None,
        binds: Vec::new(),
        env_file: None,
        env_file_note: None,
        env: Vec::new(),
        networks: Vec::new(),
        overlay_path: Setting::bare(DEFAULT_OVERLAY.to_owned()),
        overlay_size: Setting::bare(DEFAULT_OVERLAY_MIB),
        binary: None,
        extra_args: Vec::new(),
        readiness: None,
        dropped: Vec::new(),
    };
    identity::image(&mut m, &read, inputs.image_pointer);
    m.boot = identity::boot(&read);
    m.hostname = read.sh.as_ref().and_then(|s| s.hostname.clone());
    m.binds = binds(&read);
    network::networks(&mut m, &read);
    overlay::overlay(&mut m, &read, inputs.host_vars.is_some());
    env::env_file(&mut m, &read, inputs.service_env.as_ref());
    passed_through(&mut m, &read);
    m.readiness = Some(readiness());
    Ok(m)
}

fn parse_err(input: &Input, line: usize, reason: String) -> MigrateError {
    MigrateError::Parse {
        path: input.path.clone(),
        line,
        reason,
    }
}

/// `binds`: start.sh's `-B`, compared with host_vars' `mounts`.
fn binds(read: &Read) -> Vec<Setting<String>> {
    let hv_mounts = read.hv.as_ref().and_then(|h| h.mounts.clone());
    merge_lists(
        read.sh.as_ref().map(|s| s.binds.clone()),
        hv_mounts,
        "-B",
        "mounts",
    )
}

/// What only start.sh says and the service file takes as it is: `[env]`,
/// `apptainer.binary`, `apptainer.extra_args`; and the notes about each input as a whole.
fn passed_through(m: &mut Model, read: &Read) {
    if let Some(s) = &read.sh {
        m.env = s.env.clone();
        m.binary = s.binary.clone();
        // After start.sh's own extra arguments come the ones an earlier step kept there
        // (`--network-args` for a network start.sh does not join): assigning over them
        // lost them without a word.
        let kept = std::mem::take(&mut m.extra_args);
        m.extra_args = s.extra_args.clone();
        m.extra_args.extend(kept);
        m.notes.extend(s.notes.iter().cloned());
    }
    if let Some(h) = &read.hv {
        m.notes.extend(h.notes.iter().cloned());
    }
    if let Some(b) = &mut m.binary {
        if !b.value.starts_with('/') {
            b.notes.push(Note {
                level: Level::Warning,
                at: b.from[0].clone(),
                text: format!(
                    "{}: not an absolute path; apptainer.binary must be",
                    b.value
                ),
            });
        }
    }
}

/// What to say about `[readiness]`, which nothing in start.sh maps to.
fn readiness() -> Note {
    Note {
        level: Level::Note,
        at: Origin::default(),
        text: "start.sh had no notion of readiness: READY=1 now waits for the container's systemd \
               to boot; list the units that must be active too in [readiness] required_units \
               (e.g. \"httpd.service\")"
            .into(),
    }
}

/// start.sh's list, checked against host_vars'; host_vars' alone when there is no start.sh.
fn merge_lists(
    sh: Option<Vec<Setting<String>>>,
    hv: Option<Vec<Setting<String>>>,
    flag: &str,
    key: &str,
) -> Vec<Setting<String>> {
    match (sh, hv) {
        (Some(mut s), Some(h)) => {
            let sv: Vec<&str> = s.iter().map(|x| x.value.as_str()).collect();
            let hvv: Vec<&str> = h.iter().map(|x| x.value.as_str()).collect();
            if sv == hvv {
                for (a, b) in s.iter_mut().zip(&h) {
                    a.from.extend(b.from.iter().cloned());
                }
            } else {
                let only_sh: Vec<&str> = sv.iter().filter(|v| !hvv.contains(v)).copied().collect();
                let only_hv: Vec<&str> = hvv.iter().filter(|v| !sv.contains(v)).copied().collect();
                let text = format!(
                    "start.sh's {flag} and host_vars' {key} differ (only in start.sh: {only_sh:?}; \
                     only in host_vars: {only_hv:?}{}): start.sh is what ran, so its list is used",
                    if only_sh.is_empty() && only_hv.is_empty() {
                        "; the order differs"
                    } else {
                        ""
                    }
                );
                let at = h
                    .first()
                    .and_then(|x| x.from.first().cloned())
                    .unwrap_or_default();
                if let Some(f) = s.first_mut() {
                    f.notes.push(Note {
                        level: Level::Warning,
                        at,
                        text,
                    });
                }
            }
            s
        }
        (Some(s), None) => s,
        (None, Some(h)) => h,
        (None, None) => Vec::new(),
    }
}
