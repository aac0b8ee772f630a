//! `[overlay]`: start.sh's `--overlay` (already resolved by its reader), else the
//! default path the supervisor always attaches; the size Ansible creates it with.

use super::Read;
use crate::config::{DEFAULT_OVERLAY, DEFAULT_OVERLAY_MIB};
use crate::migrate::{Level, Model, Note, Origin, Setting};

/// Sets `m.overlay_path` and `m.overlay_size`; `have_host_vars` chooses which default
/// the size note names.
pub(super) fn overlay(m: &mut Model, read: &Read, have_host_vars: bool) {
    let sh_overlay = read.sh.as_ref().and_then(|s| s.overlay.clone());
    match (&read.sh, sh_overlay) {
        (_, Some(o)) => m.overlay_path = o,
        (Some(s), None) => {
            let mut o = Setting::bare(DEFAULT_OVERLAY.to_owned());
            o.notes.push(Note {
                level: Level::Warning,
                at: Origin {
                    file: read.sh_label.clone(),
                    line: s.instance.as_ref().map_or(0, |i| i.from[0].line),
                },
                text: "start.sh attaches no --overlay; the supervisor always does, and creates \
                       this one if it is missing"
                    .into(),
            });
            m.overlay_path = o;
        }
        (None, None) => {}
    }
    match read.hv.as_ref().and_then(|h| h.overlay_size.clone()) {
        Some(s) => m.overlay_size = s,
        None => {
            let mut s = Setting::bare(DEFAULT_OVERLAY_MIB);
            s.notes.push(Note {
                level: Level::Note,
                at: Origin::default(),
                text: if have_host_vars {
                    "host_vars set no overlay_size: Ansible's default (overlay_size | default(1024))".into()
                } else {
                    "no host_vars given: Ansible's default (overlay_size | default(1024)); used \
                     only if the image has to be created"
                        .into()
                },
            });
            m.overlay_size = s;
        }
    }
}
