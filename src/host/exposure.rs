//! Binds that expose service files to a container: a bind source that holds this or another
//! service's service directory, env file or overlay. Root inside the container could then
//! rewrite another service's env file (which that service's next start reads as host root,
//! for the environment of root's `apptainer`) or its overlay. Only the paths are compared,
//! resolved as far as they exist, so plain `check` warns too, on any machine.

use std::path::{Path, PathBuf};

use super::canonical_path;
use crate::config::{keys, BindOpt, Service};

/// One warning per bind that exposes service files, naming the bind, the files and the
/// narrower bind to use. `others`: the other services of the configuration directory.
pub fn bind_exposures<'a>(
    s: &'a Service,
    others: impl IntoIterator<Item = &'a Service>,
) -> Vec<String> {
    let services: Vec<&Service> = std::iter::once(s).chain(others).collect();
    let mut out = Vec::new();
    for b in &s.binds {
        let src = canonical_path(&b.src);
        // (service, what it exposes), and the first directories below the source that
        // lead to them: what a narrower bind must leave out.
        let mut exposed: Vec<(String, Vec<String>)> = Vec::new();
        let mut leave_out: Vec<PathBuf> = Vec::new();
        for o in &services {
            let mut what: Vec<String> = Vec::new();
            let dir = canonical_path(&o.service_dir);
            let mut inside: Vec<&str> = Vec::new();
            for (p, name) in [
                (&o.service_dir, "service directory"),
                (&o.env_file.path, "env file"),
                (&o.overlay.path, "overlay"),
            ] {
                let p = canonical_path(p);
                let Ok(rest) = p.strip_prefix(&src) else {
                    continue;
                };
                let lead = rest
                    .components()
                    .next()
                    .map_or_else(|| src.clone(), |c| src.join(c));
                if !leave_out.contains(&lead) {
                    leave_out.push(lead);
                }
                // Named once: the service directory, holding the default env file and overlay.
                if name != "service directory" && !what.is_empty() && p.starts_with(&dir) {
                    inside.push(name);
                } else {
                    what.push(format!("{name} {}", p.display()));
                }
            }
            if let (Some(first), false) = (what.first_mut(), inside.is_empty()) {
                first.push_str(&format!(" (with its {})", inside.join(" and ")));
            }
            if !what.is_empty() {
                let who = if o.name == s.name {
                    format!("this service ({})", o.name)
                } else {
                    format!("service {}", o.name)
                };
                exposed.push((who, what));
            }
        }
        if exposed.is_empty() {
            continue;
        }
        let files = exposed
            .iter()
            .map(|(who, what)| format!("{who}: {}", what.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        let access = match b.opts {
            Some(BindOpt::Ro) => "read (an env file may hold secrets)",
            _ => "rewrite an env file that the next start of that service reads as host root, or its overlay",
        };
        out.push(format!(
            "{}:{}:{}: {}: bind {:?} exposes service files to the container: {files}; root inside it could {access}\n  hint: {}",
            s.file.display(),
            b.line,
            b.column,
            keys::BINDS,
            b.spec(),
            narrower(&src, &leave_out)
        ));
    }
    out
}

/// The narrower bind to use instead of `src`, leaving out `leave_out`.
fn narrower(src: &Path, leave_out: &[PathBuf]) -> String {
    if leave_out.iter().any(|l| l == src) {
        return format!(
            "do not bind {} itself; bind only the directories below it that the container needs (e.g. ${{service_dir}}/root)",
            src.display()
        );
    }
    let out = leave_out
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    // On this host, the directories of the source that hold no service file.
    let keep: Vec<String> = std::fs::read_dir(src)
        .map(|rd| {
            let mut v: Vec<String> = rd
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .filter(|p| !leave_out.contains(p))
                .map(|p| format!("{:?}", p.display().to_string()))
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    if keep.is_empty() {
        format!(
            "bind only what the container needs below {}, leaving out {out}",
            src.display()
        )
    } else {
        format!(
            "bind only what the container needs below {}, leaving out {out}: of {}, {}",
            src.display(),
            src.display(),
            keep.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, dir: &str, binds: &str) -> Service {
        crate::config::parse(
            &format!("name = \"{name}\"\nservice_dir = \"{dir}\"\nbinds = [{binds}]\n"),
            Path::new(&format!("/etc/apptainer-supervisor/{name}.toml")),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_bind_holding_service_files_is_named_with_the_files_and_the_narrower_bind() {
        let a = svc(
            "a",
            "/nonexistent-asv/shared/services/a",
            "\"/nonexistent-asv/shared\", \"/nonexistent-asv/home:/home:ro\", \"${service_dir}/root:/root\"",
        );
        let b = svc("b", "/nonexistent-asv/shared/services/b", "");
        let w = bind_exposures(&a, [&b]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            w[0],
            "/etc/apptainer-supervisor/a.toml:3:10: binds: bind \"/nonexistent-asv/shared\" exposes service files to the container: \
             this service (a): service directory /nonexistent-asv/shared/services/a (with its env file and overlay); \
             service b: service directory /nonexistent-asv/shared/services/b (with its env file and overlay); \
             root inside it could rewrite an env file that the next start of that service reads as host root, or its overlay\n  \
             hint: bind only what the container needs below /nonexistent-asv/shared, leaving out /nonexistent-asv/shared/services"
        );
        // The service directory itself, read-only.
        let c = svc("c", "/nonexistent-asv/c", "\"${service_dir}:/srv:ro\"");
        let w = bind_exposures(&c, []);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("root inside it could read (an env file may hold secrets)"),
            "{}",
            w[0]
        );
        assert!(
            w[0].contains("hint: do not bind /nonexistent-asv/c itself"),
            "{}",
            w[0]
        );
    }
}
