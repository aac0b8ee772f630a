//! The managed image pointer: the one definition of when a service's `image` is "managed",
//! i.e. a symbolic link that a future `update` may switch atomically (issue 17), and what
//! `check` and `status` say about it. Read from the link's name alone: a multi-GB image is
//! never hashed here, the content address in its file name is its digest.
//!
//! The rule (apptainer-supervisor(8), IMAGE POINTER): `image` is a symbolic link (any name,
//! e.g. `containers/current.sif`) whose link text is exactly `images/sha256-<64 lowercase
//! hex>.sif`, relative, so the images directory sits beside the pointer; the target, with
//! every link resolved, is a regular file at that very place (neither `images/` nor the
//! file is itself a link elsewhere). The hex is the SIF file's sha256, which is the digest
//! of the ORAS layer that `apptainer pull oras://` verifies (Apptainer
//! internal/pkg/client/oras/oras.go: the layer's digest is checked against the blob).

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The directory beside the pointer that holds the content-addressed images.
pub const IMAGES_DIR: &str = "images";
/// A suggested name for the pointer, used in the hints.
pub const POINTER_NAME: &str = "current.sif";

/// What a service's `image` is, as `check` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ImageSource {
    /// A pointer by the rule above: `update` can switch it.
    Managed {
        /// The path the service file names (the link).
        pointer: PathBuf,
        /// The file that runs: the link resolved (what Apptainer is given).
        target: PathBuf,
        /// `sha256:<64 hex>`, read from the target's name.
        digest: String,
    },
    /// Anything else: runs as ever, but `update` will refuse it.
    Unmanaged {
        /// The path the service file names.
        path: PathBuf,
        /// The file that runs (the path with its links resolved).
        target: PathBuf,
        /// Why it is not managed.
        reason: String,
        /// The change to the layout and the service file that makes it managed.
        fix: String,
    },
    /// A symbolic link whose target does not exist: nothing could run.
    Dangling {
        pointer: PathBuf,
        /// The link text.
        link: PathBuf,
    },
}

impl ImageSource {
    /// `sha256:<64 hex>` of a managed image.
    pub fn digest(&self) -> Option<&str> {
        match self {
            ImageSource::Managed { digest, .. } => Some(digest),
            _ => None,
        }
    }

    /// The images directory beside a managed pointer (`update`'s record, lock and
    /// content-addressed images live there); `None` for any other image.
    pub fn images_dir(&self) -> Option<PathBuf> {
        match self {
            ImageSource::Managed { pointer, .. } => Some(images_dir(pointer)),
            _ => None,
        }
    }

    /// Why nothing could run, for a dangling pointer: `check`, `check --host` and `run`
    /// refuse it (exit 78) at the `image` key.
    pub fn dangling(&self) -> Option<String> {
        match self {
            ImageSource::Dangling { pointer, link } => Some(format!(
                "image {} is a symbolic link to {}, which does not exist: nothing could run\n  hint: point it at an existing image: ln -sfn {IMAGES_DIR}/sha256-<hex>.sif {}",
                pointer.display(),
                link.display(),
                pointer.display()
            )),
            _ => None,
        }
    }
}

/// The images directory beside `pointer`.
pub fn images_dir(pointer: &Path) -> PathBuf {
    pointer.parent().unwrap_or(Path::new("/")).join(IMAGES_DIR)
}

/// `sha256:` and the first 12 hex digits, as `status` shows a digest.
pub fn short_digest(digest: &str) -> &str {
    digest.get(..7 + 12).unwrap_or(digest)
}

/// The hex of `sha256-<64 lowercase hex>.sif`, if `name` is one.
fn content_address(name: &str) -> Option<&str> {
    let hex = name.strip_prefix("sha256-")?.strip_suffix(".sif")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// `a` as one word for sh(1), quoted only when it needs to be: the hints are commands an
/// operator pastes, and `check` shows the argv so (display only: it never runs a shell).
pub(crate) fn sh_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-,:=+@%".contains(c))
    {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// What `image` (as the service file names it) is on this host now. `resolved` is the path
/// the run gives Apptainer ([`super::canonical_path`] of `image`), so that what is classified
/// is what runs: a link switched between the two reads is reported unmanaged, never
/// mistaken for another digest.
pub fn classify(image: &Path, resolved: &Path) -> ImageSource {
    let unmanaged = |reason: String, fix: String| ImageSource::Unmanaged {
        path: image.to_owned(),
        target: resolved.to_owned(),
        reason,
        fix,
    };
    let dir = image.parent().unwrap_or(Path::new("/"));
    let link = match std::fs::symlink_metadata(image) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(image) {
            Ok(l) => l,
            Err(e) => return unmanaged(format!("the link cannot be read: {e}"), String::new()),
        },
        Ok(m) if m.is_dir() => {
            return unmanaged(
                "image is a sandbox directory: only a SIF file has a content address".to_owned(),
                String::new(),
            );
        }
        _ => {
            let d = dir.to_string_lossy();
            let f = image
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            return unmanaged(
                "image is not a symbolic link to images/sha256-<hex>.sif".to_owned(),
                format!(
                    "cd {} && mkdir -p {IMAGES_DIR} && h=$(sha256sum {f} | cut -c1-64) && ln {f} {IMAGES_DIR}/sha256-$h.sif && ln -s {IMAGES_DIR}/sha256-$h.sif {POINTER_NAME}; then set image = \"{d}/{POINTER_NAME}\" in the service file",
                    sh_quote(&d),
                    f = sh_quote(&f),
                ),
            );
        }
    };
    if std::fs::metadata(image).is_err() {
        return ImageSource::Dangling {
            pointer: image.to_owned(),
            link,
        };
    }
    let repoint = format!(
        "ln {t} {d}/{IMAGES_DIR}/sha256-$(sha256sum {t} | cut -c1-64).sif, then point {p} at it: ln -sfn {IMAGES_DIR}/sha256-<that hex>.sif {p}",
        t = sh_quote(&resolved.to_string_lossy()),
        d = sh_quote(&dir.to_string_lossy()),
        p = sh_quote(&image.to_string_lossy()),
    );
    let mut parts = link.components();
    let name = match (parts.next(), parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(d)), Some(std::path::Component::Normal(n)), None)
            if d == IMAGES_DIR =>
        {
            n.to_str().and_then(content_address)
        }
        _ => None,
    };
    let Some(hex) = name else {
        return unmanaged(
            format!(
                "the pointer's link text {} is not {IMAGES_DIR}/sha256-<64 hex>.sif",
                link.display()
            ),
            repoint,
        );
    };
    // Resolved, the target must be that very file: `images/` or the file being a link
    // elsewhere would let the name promise a content it does not address.
    let expected = super::canonical_path(dir).join(&link);
    let is_file = std::fs::symlink_metadata(resolved).is_ok_and(|m| m.file_type().is_file());
    if resolved != expected || !is_file {
        return unmanaged(
            format!(
                "the pointer's target resolves to {}, not to the file {}",
                resolved.display(),
                expected.display()
            ),
            repoint,
        );
    }
    ImageSource::Managed {
        pointer: image.to_owned(),
        target: resolved.to_owned(),
        digest: format!("sha256:{hex}"),
    }
}

/// The link text of a managed pointer to the image of sha256 `hex`.
pub fn link_text(hex: &str) -> PathBuf {
    Path::new(IMAGES_DIR).join(format!("sha256-{hex}.sif"))
}

/// The hex of a `sha256:<64 hex>` digest.
pub fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    content_address(&format!("sha256-{hex}.sif")).map(|_| hex)
}

/// Points `pointer` at `images/sha256-<hex>.sif` in one step: a new link beside it, renamed
/// over it (rename(2) replaces the name atomically, so a start in between runs either the
/// old image or the new one, never none), then the directory synced so that the switch
/// survives a crash of the host. An error means the pointer was not switched: once the
/// rename is done the switch stands, and a failed sync (rare; it would only lose the
/// switch in a crash) is not reported as a failed switch.
pub fn switch(pointer: &Path, hex: &str) -> std::io::Result<()> {
    let dir = pointer.parent().unwrap_or(Path::new("/"));
    let name = pointer
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.switch-{}", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(link_text(hex), &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, pointer) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn at(image: &Path) -> ImageSource {
        classify(image, &super::super::canonical_path(image))
    }

    #[test]
    fn content_addresses_are_exactly_64_lowercase_hex() {
        assert_eq!(content_address(&format!("sha256-{HEX}.sif")), Some(HEX));
        assert_eq!(content_address(&format!("sha256-{}.sif", &HEX[1..])), None);
        assert_eq!(
            content_address(&format!("sha256-{}.sif", HEX.to_uppercase())),
            None
        );
        assert_eq!(content_address(&format!("sha512-{HEX}.sif")), None);
        assert_eq!(content_address(&format!("sha256-{HEX}.img")), None);
    }

    #[test]
    fn a_relative_link_into_images_is_managed_and_the_rest_is_not() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(root.join("images")).unwrap();
        let file = root.join(format!("images/sha256-{HEX}.sif"));
        std::fs::write(&file, "sif").unwrap();
        let ptr = root.join("current.sif");
        symlink(format!("images/sha256-{HEX}.sif"), &ptr).unwrap();
        assert_eq!(
            at(&ptr),
            ImageSource::Managed {
                pointer: ptr.clone(),
                target: file.clone(),
                digest: format!("sha256:{HEX}"),
            }
        );
        assert_eq!(
            short_digest(at(&ptr).digest().unwrap()),
            "sha256:0123456789ab"
        );

        // A plain file, an absolute link, a link to a name that is no content address.
        assert!(matches!(at(&file), ImageSource::Unmanaged { .. }));
        let abs = root.join("abs.sif");
        symlink(&file, &abs).unwrap();
        assert!(matches!(at(&abs), ImageSource::Unmanaged { .. }));
        std::fs::write(root.join("images/ww.sif"), "sif").unwrap();
        let named = root.join("named.sif");
        symlink("images/ww.sif", &named).unwrap();
        let ImageSource::Unmanaged { reason, fix, .. } = at(&named) else {
            panic!("managed: {named:?}");
        };
        assert!(
            reason.contains("is not images/sha256-<64 hex>.sif"),
            "{reason}"
        );
        assert!(fix.contains("ln -sfn images/sha256-"), "{fix}");

        // The right name through a linked images/ directory resolves elsewhere.
        let other = root.join("other");
        std::fs::create_dir_all(other.join("real")).unwrap();
        std::fs::write(other.join(format!("real/sha256-{HEX}.sif")), "sif").unwrap();
        symlink("real", other.join("images")).unwrap();
        symlink(
            format!("images/sha256-{HEX}.sif"),
            other.join("current.sif"),
        )
        .unwrap();
        assert!(matches!(
            at(&other.join("current.sif")),
            ImageSource::Unmanaged { .. }
        ));

        // A sandbox directory has no content address; a path with a space is quoted.
        assert!(matches!(
            at(&root.join("images")),
            ImageSource::Unmanaged { fix, .. } if fix.is_empty()
        ));
        let spaced = root.join("with space");
        std::fs::create_dir(&spaced).unwrap();
        std::fs::write(spaced.join("c.sif"), "sif").unwrap();
        let ImageSource::Unmanaged { fix, .. } = at(&spaced.join("c.sif")) else {
            panic!("managed");
        };
        assert!(
            fix.starts_with(&format!("cd '{}' && ", spaced.display())),
            "{fix}"
        );

        // A dangling pointer.
        let gone = root.join("gone.sif");
        symlink(format!("images/sha256-{}.sif", "f".repeat(64)), &gone).unwrap();
        assert!(matches!(at(&gone), ImageSource::Dangling { .. }));
    }
}
