//! An Ansible host_vars file (`inventory/prod/host_vars/ood001.yml`), read for the keys
//! the seed shows: `servicename`, `container_url`, `install_path`, and under
//! `apptainer_options` the `network` list, the `mounts` list, `boot` and `overlay_size`
//! (apptainer-launchers-and-monitoring.md, "OOD Deployment Example" and ww001's host_vars;
//! `overlay_size` feeds `apptainer overlay create -S -s {{ … | default(1024) }}`).
//!
//! Parsed with serde_norway into a generic value, then walked by hand, so that each key
//! not mapped can be reported by name. serde_norway's values carry no positions; the line
//! of a key is found again in the text ([`key_line`]), which is exact for the block-style
//! YAML Ansible inventories use.

use serde_norway::Value;

use super::{Level, Note, Origin, Setting};

/// Keys that are Ansible's (connection, placement) or configure what runs inside the
/// container: they have no place in a service file and are mentioned, not warned about.
const NOT_FOR_LAUNCH: &[&str] = &[
    "master_host",
    "priority",
    "sshd",
    "managed_nodes",
    "frontends",
];

#[derive(Debug, Default)]
pub struct HostVars {
    pub servicename: Option<Setting<String>>,
    pub container_url: Option<Setting<String>>,
    pub install_path: Option<Setting<String>>,
    /// `apptainer_options.network`, when present.
    pub networks: Option<Vec<Setting<String>>>,
    /// `apptainer_options.mounts`, with `$DIRNAME` as `${service_dir}`.
    pub mounts: Option<Vec<Setting<String>>>,
    pub boot: Option<Setting<bool>>,
    pub overlay_size: Option<Setting<u64>>,
    pub notes: Vec<Note>,
}

/// Not YAML, or not host_vars of the expected shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub line: usize,
    pub reason: String,
}

pub fn read(text: &str, label: &str) -> Result<HostVars, YamlError> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| YamlError {
        line: e.location().map_or(1, |l| l.line()),
        reason: e.to_string(),
    })?;
    let at = |path: &[&str]| Origin {
        file: label.to_owned(),
        line: key_line(text, path),
    };
    let bad = |path: &[&str], want: &str| YamlError {
        line: key_line(text, path),
        reason: format!("{}: expected {want}", path.join(".")),
    };
    let Value::Mapping(top) = doc else {
        return Err(YamlError {
            line: 1,
            reason: "expected a mapping of host variables (key: value)".into(),
        });
    };
    let mut out = HostVars::default();
    for (k, v) in &top {
        let Some(key) = k.as_str() else {
            return Err(YamlError {
                line: 1,
                reason: format!("a key that is not a string: {k:?}"),
            });
        };
        let path = [key];
        match key {
            "servicename" | "container_url" | "install_path" => {
                let s = v.as_str().ok_or_else(|| bad(&path, "a string"))?;
                let mut setting = Setting::new(s.to_owned(), at(&path));
                jinja(&mut setting, label);
                match key {
                    "servicename" => out.servicename = Some(setting),
                    "container_url" => out.container_url = Some(setting),
                    _ => out.install_path = Some(setting),
                }
            }
            "apptainer_options" => {
                let Value::Mapping(opts) = v else {
                    return Err(bad(&path, "a mapping"));
                };
                for (ok, ov) in opts {
                    let Some(okey) = ok.as_str() else {
                        return Err(bad(&path, "string keys"));
                    };
                    let path = [key, okey];
                    match okey {
                        "network" => out.networks = Some(strings(ov, &path, text, label)?),
                        "mounts" => {
                            let mut m = strings(ov, &path, text, label)?;
                            for s in &mut m {
                                s.value = super::start_sh::finish(
                                    &s.value
                                        .replace("${DIRNAME}", "${service_dir}")
                                        .replace("$DIRNAME", "${service_dir}"),
                                );
                            }
                            out.mounts = Some(m);
                        }
                        "boot" => {
                            let b = ov.as_bool().ok_or_else(|| bad(&path, "true or false"))?;
                            out.boot = Some(Setting::new(b, at(&path)));
                        }
                        "overlay_size" => {
                            let n = ov
                                .as_u64()
                                .ok_or_else(|| bad(&path, "a whole number of MiB"))?;
                            out.overlay_size = Some(Setting::new(n, at(&path)));
                        }
                        other => out.notes.push(Note {
                            level: Level::Warning,
                            at: at(&path),
                            text: format!(
                                "apptainer_options.{other}: not mapped (no service-file key for it); \
                                 add its effect by hand, e.g. in apptainer.extra_args"
                            ),
                        }),
                    }
                }
            }
            k if k.starts_with("ansible_") || NOT_FOR_LAUNCH.contains(&k) => out.notes.push(Note {
                level: Level::Note,
                at: at(&path),
                text: format!("{k}: Ansible's or the container's own setting, not part of starting it; not mapped"),
            }),
            other => out.notes.push(Note {
                level: Level::Warning,
                at: at(&path),
                text: format!("{other}: unknown host variable; not mapped"),
            }),
        }
    }
    Ok(out)
}

/// A list of strings (or one string, which Ansible's templates also accept for `network`).
fn strings(
    v: &Value,
    path: &[&str],
    text: &str,
    label: &str,
) -> Result<Vec<Setting<String>>, YamlError> {
    let first = key_line(text, path);
    let items: Vec<&Value> = match v {
        Value::Sequence(s) => s.iter().collect(),
        Value::String(_) => vec![v],
        _ => {
            return Err(YamlError {
                line: first,
                reason: format!("{}: expected a list of strings", path.join(".")),
            })
        }
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let s = item.as_str().ok_or_else(|| YamlError {
            line: first + 1 + i,
            reason: format!("{}: item {} is not a string", path.join("."), i + 1),
        })?;
        let line = item_line(text, first, i, s);
        let mut setting = Setting::new(
            s.to_owned(),
            Origin {
                file: label.to_owned(),
                line,
            },
        );
        jinja(&mut setting, label);
        out.push(setting);
    }
    Ok(out)
}

fn jinja(s: &mut Setting<String>, _label: &str) {
    if s.value.contains("{{") || s.value.contains("{%") {
        let at = s.from.first().cloned().unwrap_or_default();
        s.notes.push(Note {
            level: Level::Warning,
            at,
            text: format!(
                "{:?} is a Jinja template, which migrate does not expand",
                s.value
            ),
        });
    }
}

/// The line of `a.b.c`: each key found at a deeper indentation after its parent.
pub fn key_line(text: &str, path: &[&str]) -> usize {
    let mut from = 0;
    let mut indent: Option<usize> = None;
    let mut found = 1;
    for key in path {
        let hit = text.lines().enumerate().skip(from).find(|(_, l)| {
            let t = l.trim_start();
            let ind = l.len() - t.len();
            indent.is_none_or(|p| ind > p)
                && (t.starts_with(&format!("{key}:")) || t.starts_with(&format!("\"{key}\":")))
        });
        match hit {
            Some((i, l)) => {
                found = i + 1;
                from = i + 1;
                indent = Some(l.len() - l.trim_start().len());
            }
            None => return found,
        }
    }
    found
}

/// The line of the `i`-th item of a block list starting after line `first`.
fn item_line(text: &str, first: usize, i: usize, value: &str) -> usize {
    text.lines()
        .enumerate()
        .skip(first)
        .filter(|(_, l)| l.trim_start().starts_with("- "))
        .nth(i)
        .filter(|(_, l)| l.contains(value))
        .map_or(first, |(n, _)| n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WW: &str = "ansible_host: ww001\nservicename: ww001\nmaster_host: core015\n\
container_url: oras://ghcr.io/mit-orcd/warewulf-4.6.1:main_latest\napptainer_options:\n  \
overlay_size: 100000  # 100GB\n  network:\n    - macvlan_ww001\n    - ipmi_bridge_ww001\n  \
mounts:\n    - /etc/slurm\n    - $DIRNAME/root:/root\n  boot: true\nmanaged_nodes:\n  - node4100\n";

    #[test]
    fn maps_the_seed_keys() {
        let h = read(WW, "ww001.yml").unwrap();
        assert_eq!(h.servicename.unwrap().value, "ww001");
        assert_eq!(h.overlay_size.as_ref().unwrap().value, 100000);
        assert_eq!(h.overlay_size.unwrap().from[0].line, 6);
        let nets: Vec<_> = h.networks.unwrap().into_iter().map(|s| s.value).collect();
        assert_eq!(nets, ["macvlan_ww001", "ipmi_bridge_ww001"]);
        let m = h.mounts.unwrap();
        assert_eq!(m[1].value, "${service_dir}/root:/root");
        assert_eq!(m[1].from[0].line, 12);
        assert!(h.boot.unwrap().value);
        let notes: Vec<_> = h.notes.iter().map(|n| (n.level, n.at.line)).collect();
        assert_eq!(
            notes,
            [(Level::Note, 1), (Level::Note, 3), (Level::Note, 14)]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let e = read("a: [1, 2\nb: 3\n", "x.yml").unwrap_err();
        assert!(e.line >= 1, "{e:?}");
        let e = read(
            "servicename: x\napptainer_options:\n  boot: maybe\n",
            "x.yml",
        )
        .unwrap_err();
        assert_eq!(
            e,
            YamlError {
                line: 3,
                reason: "apptainer_options.boot: expected true or false".into()
            }
        );
        assert_eq!(read("- a\n- b\n", "x.yml").unwrap_err().line, 1);
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let h = read(
            "servicename: x\napptainer_options:\n  gpus: true\nfoo: 1\n",
            "x.yml",
        )
        .unwrap();
        let w: Vec<_> = h
            .notes
            .iter()
            .filter(|n| n.level == Level::Warning)
            .map(|n| n.at.line)
            .collect();
        assert_eq!(w, [3, 4]);
    }
}
