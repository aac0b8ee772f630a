//! `check`'s text rendering of a [`Plan`].

use super::Plan;
use crate::host::image_pointer::{sh_quote as quote, short_digest, ImageSource};

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

/// Which file will run, and whether `update` can switch it.
fn render_image(i: &ImageSource) -> String {
    match i {
        ImageSource::Managed {
            pointer,
            target,
            digest,
        } => format!(
            "\nimage: {} -> {}\n  managed (digest {}, read from the file's name)\n",
            pointer.display(),
            target.display(),
            short_digest(digest)
        ),
        ImageSource::Unmanaged {
            path,
            target,
            reason,
            fix,
        } => {
            let arrow = if path == target {
                String::new()
            } else {
                format!(" -> {}", target.display())
            };
            let hint = if fix.is_empty() {
                String::new()
            } else {
                format!("\n  hint: {fix}")
            };
            format!(
                "\nimage: {}{arrow}\n  unmanaged: `update` will refuse it ({reason}){hint}\n",
                path.display()
            )
        }
        ImageSource::Dangling { pointer, link } => format!(
            "\nimage: {} -> {} (missing)\n",
            pointer.display(),
            link.display()
        ),
    }
}

pub fn render_text(p: &Plan) -> String {
    let argv: Vec<String> = p
        .argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut out = format!("{}: service {} is valid", p.file.display(), p.name);
    out.push_str(if p.host_checked {
        " (host checked)\n"
    } else {
        " (static check; --host checks this host too)\n"
    });
    for w in &p.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out.push_str(&render_image(&p.image));
    out.push_str("\ninstance start (argv, no shell):\n  ");
    out.push_str(&group_flags(&argv).join(" \\\n    "));
    out.push_str("\n\noverlay create, only when the image is missing:\n  ");
    out.push_str(
        &p.overlay_create
            .iter()
            .map(|a| quote(&a.to_string_lossy()))
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
