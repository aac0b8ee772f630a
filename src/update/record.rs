//! What `update` remembers, beside the images: `images/update.json`. The images an update
//! placed (the only ones retention ever removes), the rollback target, and the last
//! update's result, which `status --json` shows.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file in the images directory.
pub const FILE: &str = "update.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub schema: u32,
    /// The digest that ran before the last good update: what a rollback goes back to, and
    /// never removed.
    #[serde(default)]
    pub previous: Option<String>,
    /// Images in `images/` that updates placed or switched away from, newest first.
    #[serde(default)]
    pub images: Vec<Kept>,
    #[serde(default)]
    pub last: Option<Last>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub digest: String,
    /// Unix time (s) it was placed or last switched away from.
    pub at: u64,
    /// `ran`, or `failed: <cause>` for an image an update rolled back.
    pub note: String,
}

/// One update, as it ended (or `in-progress` while it runs: a crash leaves it so).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Last {
    /// `updated`, `unchanged`, `rolled-back`, `rollback-failed`, `refused`, `interrupted`,
    /// `failed`, `in-progress`.
    pub result: String,
    pub from: String,
    pub to: Option<String>,
    pub url: String,
    /// The manifest digest the registry gave for `url` when it was pulled (`oras://`
    /// only; None when it did not say, see `update/manifest.rs`).
    #[serde(default)]
    pub manifest_digest: Option<String>,
    pub started_at: u64,
    pub ended_at: Option<u64>,
    /// Why it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// The overlay as the failed boot left it, kept for inspection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_overlay: Option<PathBuf>,
    /// Whether the overlay was snapshotted (false: `--no-overlay-snapshot`, or no overlay).
    pub snapshot: bool,
    /// Milliseconds per step: pull, stop, snapshot, switch, start, probation, rollback.
    #[serde(default)]
    pub timings_ms: std::collections::BTreeMap<String, u64>,
}

pub const SCHEMA: u32 = 1;

pub fn path(images: &Path) -> PathBuf {
    images.join(FILE)
}

/// The record, or an empty one when there is none yet (or it cannot be parsed: it is
/// rewritten whole by the next update; the images themselves are never judged by it
/// alone, see [`retain`]).
pub fn read(images: &Path) -> Record {
    std::fs::File::open(path(images))
        .ok()
        .and_then(|f| crate::os::fsutil::read_regular(f, 1 << 20).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub fn write(images: &Path, r: &Record) -> std::io::Result<()> {
    let mut r = r.clone();
    r.schema = SCHEMA;
    let text = serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?;
    crate::os::fsutil::write_atomic(&path(images), &text, 0o644)
}

impl Record {
    /// Notes `digest` as kept (newest first, once).
    pub fn keep(&mut self, digest: &str, at: u64, note: &str) {
        self.images.retain(|k| k.digest != digest);
        self.images.insert(
            0,
            Kept {
                digest: digest.to_owned(),
                at,
                note: note.to_owned(),
            },
        );
    }
}

/// Retention after an update: of the images the record lists, all but the running one,
/// the rollback target and the newest `keep` others are removed from `images/` and from
/// the record. Only files the record names (placed by `update`, or switched away from by
/// it) are ever removed, and only by their content address. Returns what was removed.
pub fn retain(images: &Path, r: &mut Record, running: &str, keep: u64) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut others = 0u64;
    let mut kept = Vec::new();
    for k in std::mem::take(&mut r.images) {
        let protected = k.digest == running || r.previous.as_deref() == Some(&k.digest);
        if protected || others < keep {
            if !protected {
                others += 1;
            }
            kept.push(k);
            continue;
        }
        match crate::host::image_pointer::hex_of(&k.digest) {
            Some(hex) => {
                let p = images.join(format!("sha256-{hex}.sif"));
                match std::fs::remove_file(&p) {
                    Ok(()) => removed.push(p),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    // Kept in the record: tried again next time.
                    Err(_) => kept.push(k),
                }
            }
            None => kept.push(k),
        }
    }
    r.images = kept;
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    /// keep = 1: the running image, the rollback target and one other stay; older ones go,
    /// files the record does not name are never touched.
    #[test]
    fn retention_keeps_the_running_image_the_rollback_target_and_n_others() {
        let d = tempfile::tempdir().unwrap();
        for c in ['a', 'b', 'c', 'd', 'e'] {
            std::fs::write(
                d.path()
                    .join(format!("sha256-{}.sif", c.to_string().repeat(64))),
                c.to_string(),
            )
            .unwrap();
        }
        let mut r = Record {
            previous: Some(digest('d')),
            ..Record::default()
        };
        for (i, c) in ['a', 'b', 'c', 'd', 'e'].iter().enumerate() {
            r.keep(&digest(*c), i as u64, "ran");
        }
        // Newest first: e (running), d (previous), c, b, a.
        let removed = retain(d.path(), &mut r, &digest('e'), 1);
        let names: Vec<String> = r.images.iter().map(|k| k.digest.clone()).collect();
        assert_eq!(names, vec![digest('e'), digest('d'), digest('c')]);
        assert_eq!(removed.len(), 2);
        for c in ['a', 'b'] {
            assert!(!d
                .path()
                .join(format!("sha256-{}.sif", c.to_string().repeat(64)))
                .exists());
        }
        for c in ['c', 'd', 'e'] {
            assert!(d
                .path()
                .join(format!("sha256-{}.sif", c.to_string().repeat(64)))
                .exists());
        }
    }
}
