//! What the service is: its directory, its name, the image it starts and whether it
//! boots — the settings at the top of the service file.

use std::path::Path;

use super::Read;
use crate::config;
use crate::migrate::yaml::HostVars;
use crate::migrate::{service_dir_of, Inputs, Level, MigrateError, Model, Note, Origin, Setting};

/// `service_dir`: asked for, else where start.sh lies, else Ansible's
/// `install_path/servicename`.
pub(super) fn service_dir(
    inputs: &Inputs,
    hv: Option<&HostVars>,
) -> Result<Setting<String>, MigrateError> {
    Ok(match (&inputs.service_dir, &inputs.start_sh) {
        (Some(d), _) => Setting::bare(d.trim_end_matches('/').to_owned()),
        (None, Some(s)) => match service_dir_of(&s.path) {
            Some(d) => Setting::bare(d.display().to_string()),
            None => {
                return Err(MigrateError::Usage(
                    format!("{}: cannot resolve its directory", s.path.display()),
                    "pass --service-dir DIR (the directory above start.sh's bin/)",
                ))
            }
        },
        (None, None) => match hv
            .and_then(|h| Some((h.install_path.as_ref()?, h.servicename.as_ref()?)))
        {
            Some((ip, sn)) => Setting {
                value: format!("{}/{}", ip.value.trim_end_matches('/'), sn.value),
                from: vec![ip.from[0].clone(), sn.from[0].clone()],
                notes: Vec::new(),
            },
            None => return Err(MigrateError::Usage(
                "the service directory is not known from host_vars alone".into(),
                "pass --service-dir DIR (start.sh's $DIRNAME, e.g. /shared/services/ood/ood001)",
            )),
        },
    })
}

/// Notes for the header: a start.sh outside today's `bin/` layout, whose directory
/// was taken as the service directory all the same.
pub(super) fn layout_notes(inputs: &Inputs, read: &Read) -> Vec<Note> {
    let mut notes: Vec<Note> = Vec::new();
    let header = |label: &str, text: String| Note {
        level: Level::Warning,
        at: Origin {
            file: label.to_owned(),
            line: 0,
        },
        text,
    };
    if let Some(i) = &inputs.start_sh {
        let dir = i.path.parent().and_then(Path::file_name);
        if inputs.service_dir.is_none() && dir.is_some_and(|d| d != "bin") {
            notes.push(header(
                &read.sh_label,
                "start.sh is not in a bin/ directory as in today's start.sh layout; service_dir is \
                 still the directory above it, as $(dirname \"$SCRIPT\")/../ computes"
                    .into(),
            ));
        }
    }
    notes
}

/// `name`: asked for, else start.sh's instance name, else host_vars' servicename; each
/// disagreement is noted, since the name is what `apptainer instance list` shows.
pub(super) fn name(inputs: &Inputs, read: &Read) -> Result<Setting<String>, MigrateError> {
    let from_sh = read.sh.as_ref().and_then(|s| s.instance.clone());
    let from_hv = read.hv.as_ref().and_then(|h| h.servicename.clone());
    let mut name = match (&inputs.name, &from_sh, &from_hv) {
        (Some(n), _, _) => Setting::bare(n.clone()),
        (None, Some(s), _) => s.clone(),
        (None, None, Some(h)) => h.clone(),
        (None, None, None) => {
            return Err(MigrateError::Usage(
                "the service name is not known from the inputs".into(),
                "pass --name NAME",
            ))
        }
    };
    if let (Some(s), Some(h)) = (&from_sh, &from_hv) {
        if s.value != h.value {
            name.notes.push(Note {
                level: Level::Warning,
                at: h.from[0].clone(),
                text: format!(
                    "host_vars servicename {:?} differs from start.sh's instance name {:?}",
                    h.value, s.value
                ),
            });
        } else if inputs.name.is_none() {
            name.from.extend(h.from.iter().cloned());
        }
    }
    if let (Some(n), Some(s)) = (&inputs.name, &from_sh) {
        if *n != s.value {
            name.notes.push(Note {
                level: Level::Warning,
                at: s.from[0].clone(),
                text: format!(
                    "start.sh started the instance as {:?}; the service file names it {n:?}, \
                     so `apptainer instance list` and stop.sh's name change with it",
                    s.value
                ),
            });
        }
    }
    Ok(name)
}

/// `image` and `image_url`: start.sh's image is the local one unless it is a URL, which
/// the supervisor never pulls; host_vars' `container_url` (already in `m.image_url`) is
/// kept for image updates. With `pointer` (`--image-pointer`), `image` is the managed
/// pointer beside that local image, and a note says how to make it once.
pub(super) fn image(m: &mut Model, read: &Read, pointer: bool) {
    image_from_inputs(m, read);
    if !pointer {
        return;
    }
    use crate::host::image_pointer::{IMAGES_DIR, POINTER_NAME};
    let local = m
        .image
        .as_ref()
        .map_or_else(|| config::DEFAULT_IMAGE.to_owned(), |s| s.value.clone());
    let (dir, file) = local.rsplit_once('/').unwrap_or((".", local.as_str()));
    let mut s = Setting::bare(format!("{dir}/{POINTER_NAME}"));
    let real_dir = dir.replace("${service_dir}", &m.service_dir.value);
    s.notes.push(Note {
        level: Level::Note,
        at: Origin {
            file: "--image-pointer".into(),
            line: 0,
        },
        text: format!(
            "image is the managed pointer that `update` switches; make it once: cd {real_dir} && mkdir -p {IMAGES_DIR} && h=$(sha256sum {file} | cut -c1-64) && ln {file} {IMAGES_DIR}/sha256-$h.sif && ln -s {IMAGES_DIR}/sha256-$h.sif {POINTER_NAME}"
        ),
    });
    m.image = Some(s);
}

fn image_from_inputs(m: &mut Model, read: &Read) {
    if let Some(img) = read.sh.as_ref().and_then(|s| s.image.clone()) {
        if img.value.contains("://") {
            let mut url = img.clone();
            url.notes.push(Note {
                level: Level::Warning,
                at: img.from[0].clone(),
                text: format!(
                    "start.sh ran the image straight from {}; the service file starts a local \
                     image: pull it to {} (apptainer pull) before the first start",
                    img.value,
                    config::DEFAULT_IMAGE
                ),
            });
            if let Some(hvurl) = &m.image_url {
                if hvurl.value != img.value {
                    url.notes.push(Note {
                        level: Level::Warning,
                        at: hvurl.from[0].clone(),
                        text: format!("host_vars container_url is {:?}", hvurl.value),
                    });
                }
            }
            m.image_url = Some(url);
        } else {
            m.image = Some(img);
        }
    }
    if let Some(u) = &mut m.image_url {
        if u.from.iter().all(|o| o.file == read.hv_label) {
            u.notes.push(Note {
                level: Level::Note,
                at: u.from[0].clone(),
                text: "container_url: kept as image_url for image updates; the supervisor starts \
                       the local image and never pulls"
                    .into(),
            });
        }
    }
}

/// `boot`: whether start.sh passed `--boot` (host_vars' `boot` only checked against it);
/// host_vars' alone without a start.sh; else the default.
pub(super) fn boot(read: &Read) -> Setting<bool> {
    let hv_boot = read.hv.as_ref().and_then(|h| h.boot.clone());
    match (&read.sh, &hv_boot) {
        (Some(s), _) => {
            let mut b = s.boot.clone().unwrap_or_else(|| {
                let mut b = Setting::new(
                    false,
                    Origin {
                        file: read.sh_label.clone(),
                        line: s.instance.as_ref().map_or(0, |i| i.from[0].line),
                    },
                );
                b.notes.push(Note {
                    level: Level::Warning,
                    at: b.from[0].clone(),
                    text: "start.sh passes no --boot: the image's startscript runs instead of \
                           systemd, so readiness can only be `instance`"
                        .into(),
                });
                b
            });
            if let Some(h) = &hv_boot {
                if h.value == b.value {
                    b.from.extend(h.from.iter().cloned());
                } else {
                    b.notes.push(Note {
                        level: Level::Warning,
                        at: h.from[0].clone(),
                        text: format!(
                            "host_vars says boot: {}, start.sh {}: start.sh is what ran, so it wins",
                            h.value,
                            if b.value { "passes --boot" } else { "does not pass --boot" }
                        ),
                    });
                }
            }
            b
        }
        (None, Some(h)) => h.clone(),
        (None, None) => Setting::bare(true),
    }
}
