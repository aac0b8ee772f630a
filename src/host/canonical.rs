//! The service with its host paths resolved. Everything after loading works on a
//! [`Canonical`] service: the host checks, the [`crate::plan::Plan`] that `check` prints and
//! `run` executes, and the run itself. So what was checked is what runs, and what
//! Apptainer is given is what the kernel reports back (loop `backing_file`, mountinfo).

use std::ops::Deref;
use std::path::{Path, PathBuf};

use super::image_pointer::{self, ImageSource};
use crate::config::Service;

/// A [`Service`] whose host paths are resolved (see [`canonicalize`]); only that function
/// makes one.
#[derive(Debug, Clone)]
pub struct Canonical(Service, ImageSource);

impl Canonical {
    /// What the service file's `image` was when it was resolved: a managed pointer or not
    /// (apptainer-supervisor(8), IMAGE POINTER). The resolved path is `image` itself.
    pub fn image_source(&self) -> &ImageSource {
        &self.1
    }
}

impl Deref for Canonical {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.0
    }
}

/// `p` with every symbolic link resolved, as the kernel names it in loop devices'
/// `backing_file` and in mount tables. A path that does not exist yet (an overlay to be
/// created) gets its deepest existing ancestor resolved and the rest appended as written.
pub fn canonical_path(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => canonical_path(parent).join(name),
        _ => p.to_owned(),
    }
}

/// `p` with its directory resolved and its last component as written: for a file that
/// must not itself be a symbolic link (the env file), so that the check sees the link.
pub(crate) fn canonical_dir_of(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => canonical_path(parent).join(name),
        _ => canonical_path(p),
    }
}

/// The service with its host paths resolved (image, overlay, bind sources, service
/// directory, env file), for the argv and every check after [`check`]: what Apptainer is
/// given is what the kernel will report back (loop `backing_file`, mountinfo), and a
/// symlink swapped after the checks cannot redirect the start. Bind destinations are
/// paths inside the container and are left as written.
pub fn canonicalize(s: &Service) -> Canonical {
    let mut c = s.clone();
    c.service_dir = canonical_path(&s.service_dir);
    // The image is resolved once, here: a running instance keeps the file it was started
    // on (Apptainer is given the target, not the pointer), so switching the pointer never
    // changes what runs until the next start.
    c.image = canonical_path(&s.image);
    let source = image_pointer::classify(&s.image, &c.image);
    c.overlay.path = canonical_path(&s.overlay.path);
    // Its directory only: a symlink as the env file itself is refused by the host check.
    c.env_file.path = canonical_dir_of(&s.env_file.path);
    for b in &mut c.binds {
        b.src = canonical_path(&b.src);
    }
    Canonical(c, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_path_resolves_symlinks_also_below_a_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir_all(real.join("overlay")).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let real = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            canonical_path(&d.path().join("link/overlay")),
            real.join("overlay")
        );
        // The overlay image does not exist yet: its directory is still resolved.
        assert_eq!(
            canonical_path(&d.path().join("link/overlay/overlay.img")),
            real.join("overlay/overlay.img")
        );
        assert_eq!(
            canonical_path(&d.path().join("link/missing/deeper")),
            real.join("missing/deeper")
        );
    }
}
