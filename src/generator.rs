//! `NAME.toml` → `NAME.service`: the unit that apptainer-supervisor-generator(8) writes.
//!
//! The generated unit is the template unit `units/apptainer-supervisor@.service`, compiled
//! in, with the instance name filled in, the timeouts derived from the service file's
//! `[timeouts]`, `RequiresMountsFor=` the service's own paths, and the service file's
//! `[unit]` dependencies added. Building it from the template's text (and not from a list
//! of settings of its own) means that a setting added to the template, say a hardening
//! option, reaches every generated unit with the next build.
//!
//! Everything here is pure: the binary (`src/bin/apptainer-supervisor-generator.rs`) reads
//! the service files and writes the files that [`Generated`] describes, following
//! systemd.generator(7).

use std::path::{Path, PathBuf};

use crate::config::{Service, Timeouts, DEFAULT_CONFIG_DIR};

/// The template unit, as shipped.
pub const TEMPLATE: &str = include_str!("../units/apptainer-supervisor@.service");

/// Where packages install the supervisor; the generated `ExecStart=` runs it.
pub const SUPERVISOR_BIN: &str = "/usr/bin/apptainer-supervisor";

/// Test-only override of the directory the generator reads (default
/// [`DEFAULT_CONFIG_DIR`]). systemd starts generators with a clean environment, so on a
/// real host it is never set.
pub const CONFIG_DIR_ENV: &str = "APPTAINER_SUPERVISOR_CONFIG_DIR";

/// `TimeoutStartSec=` = `timeouts.start_sec` + this: the lock, the check for leftovers
/// and reading Apptainer's state file around the start (the template's 300 s + 30 s).
pub const START_MARGIN_SEC: u64 = 30;
/// Reaping after the last SIGKILL (the template's "+ 5 s").
pub const REAP_SEC: u64 = 5;
/// `TimeoutStopSec=` above the supervisor's own worst case (the template's 155 s < 180 s).
pub const STOP_MARGIN_SEC: u64 = 25;

/// Unit directories that rank above or below the generator's normal directory
/// (systemd.unit(5) "Unit File Load Path"), for the shadowing notice.
pub const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// The unit's time limits, derived from `[timeouts]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitTimeouts {
    pub start_sec: u64,
    pub stop_sec: u64,
    pub watchdog_sec: u64,
}

/// The template's derivation, for any `[timeouts]`:
///
/// - start: `start_sec` + 30 s (the steps before and after `instance start`);
/// - stop: the container's systemd stops each unit within its own 90 s, which fits in
///   `stop_sec` (120 s) for the whole halt; then `instance stop -F` and SIGKILL get
///   `kill_sec` (15 s) each and reaping 5 s: 90 < 120 < 120 + 2 x 15 + 5 = 155 < 180, the
///   last step being a 25 s margin;
/// - watchdog: `watchdog_sec` itself (0: none), which the supervisor expects to match.
pub fn unit_timeouts(t: &Timeouts) -> UnitTimeouts {
    UnitTimeouts {
        start_sec: t.start_sec + START_MARGIN_SEC,
        stop_sec: t.stop_sec + 2 * t.kill_sec + REAP_SEC + STOP_MARGIN_SEC,
        watchdog_sec: t.watchdog_sec,
    }
}

/// One generated unit and the links that pull it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// `NAME.service`.
    pub unit_name: String,
    pub text: String,
    /// (`TARGET.wants` or `TARGET.requires`, `NAME.service`): a symlink to
    /// `../NAME.service` in that directory of the output directory.
    pub links: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeneratorError {
    /// A value that a unit file line cannot carry, even quoted.
    #[error("{key}: {value:?} cannot be written into a unit file ({why})")]
    Unrepresentable {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    /// The template lost a line that the generator replaces (a broken build).
    #[error("the template unit has no {0}= line")]
    TemplateChanged(&'static str),
}

/// The unit for `service`, read from `config_dir`. `ExecStart=` names `--config-dir`
/// only when that is not the default, so that the unit runs the very file it came from.
pub fn render(service: &Service, config_dir: &Path) -> Result<Generated, GeneratorError> {
    let name = &service.name;
    let unit_name = format!("{name}.service");
    let t = unit_timeouts(&service.timeouts);
    let mut exec = SUPERVISOR_BIN.to_owned();
    if config_dir != Path::new(DEFAULT_CONFIG_DIR) {
        exec.push_str(" --config-dir ");
        exec.push_str(&exec_arg(&config_dir.display().to_string())?);
    }
    let template_exec = format!("{SUPERVISOR_BIN} run %i");

    let mut mounts: Vec<String> = Vec::new();
    for p in [&service.service_dir, &service.image, &service.overlay.path] {
        let p = path_value("RequiresMountsFor", p)?;
        if !mounts.contains(&p) {
            mounts.push(p);
        }
    }
    // One path, not a list: no quotes (they would be part of it), specifiers escaped.
    let source = path_value("SourcePath", &service.file)?;
    let source = match source.strip_prefix('"') {
        Some(q) => q.trim_end_matches('"').to_owned(),
        None => source,
    };

    let mut out = format!(
        "# Automatically generated by apptainer-supervisor-generator from\n\
         #   {source}\n\
         # Do not edit: change that file and run `systemctl daemon-reload`, or add a\n\
         # drop-in (`systemctl edit {unit_name}`).\n\
         # These are the settings of apptainer-supervisor@.service, with the timeouts of\n\
         # the service file's [timeouts]; see apptainer-supervisor-generator(8).\n"
    );
    let mut section = "";
    let mut seen = (false, false, false, false);
    for line in TEMPLATE.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            if section == "[Unit]" {
                unit_additions(&mut out, service, &source)?;
            }
            section = line;
            if section != "[Install]" {
                out.push('\n');
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        // [Install] is for `systemctl enable`, which refuses generated units: the links
        // of [install] in the service file take its place.
        if section == "[Install]" {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        let value = match (section, key) {
            // Conflicts=%i.service would name this very unit.
            ("[Unit]", "Conflicts") if value == "%i.service" => continue,
            ("[Unit]", "Description") => match &service.unit.description {
                Some(d) => escape_specifiers(d),
                None => value.replace("%i", name),
            },
            ("[Unit]", "RequiresMountsFor") => {
                seen.0 = true;
                mounts.join(" ")
            }
            ("[Service]", "ExecStart") if value == template_exec => {
                seen.1 = true;
                format!("{exec} run {name}")
            }
            ("[Service]", "TimeoutStartSec") => {
                seen.2 = true;
                out.push_str(&format!(
                    "# timeouts.start_sec {} s + {START_MARGIN_SEC} s\n",
                    service.timeouts.start_sec
                ));
                format!("{}s", t.start_sec)
            }
            ("[Service]", "TimeoutStopSec") => {
                seen.3 = true;
                let s = &service.timeouts;
                out.push_str(&format!(
                    "# timeouts.stop_sec {} s + 2 x timeouts.kill_sec {} s + {REAP_SEC} s = {} s, + {STOP_MARGIN_SEC} s\n",
                    s.stop_sec,
                    s.kill_sec,
                    s.stop_sec + 2 * s.kill_sec + REAP_SEC
                ));
                format!("{}s", t.stop_sec)
            }
            ("[Service]", "WatchdogSec") => {
                out.push_str("# timeouts.watchdog_sec (0: no watchdog)\n");
                format!("{}s", t.watchdog_sec)
            }
            _ => value.replace("%i", name).replace("%I", name),
        };
        out.push_str(key);
        out.push('=');
        out.push_str(&unit_line_end(&value));
        out.push('\n');
    }
    match seen {
        (false, ..) => return Err(GeneratorError::TemplateChanged("RequiresMountsFor")),
        (_, false, ..) => return Err(GeneratorError::TemplateChanged("ExecStart")),
        (_, _, false, _) => return Err(GeneratorError::TemplateChanged("TimeoutStartSec")),
        (.., false) => return Err(GeneratorError::TemplateChanged("TimeoutStopSec")),
        _ => {}
    }

    let mut links = Vec::new();
    for (dir, units) in [
        ("wants", &service.install.wanted_by),
        ("requires", &service.install.required_by),
    ] {
        for u in units {
            links.push((format!("{u}.{dir}"), unit_name.clone()));
        }
    }
    Ok(Generated {
        unit_name,
        text: out,
        links,
    })
}

/// What the generated unit adds at the end of `[Unit]`.
fn unit_additions(out: &mut String, service: &Service, source: &str) -> Result<(), GeneratorError> {
    let name = &service.name;
    out.push_str("Documentation=man:apptainer-supervisor-generator(8)\n");
    out.push_str(&format!("SourcePath={source}\n"));
    // One supervisor per service name: both units take the same lock and the same
    // instance. Conflicts= stops the other one; the ordering makes that stop finish
    // before this start begins (systemd.unit(5): a stop is ordered before a start
    // whichever direction the ordering has), instead of both racing for the lock.
    out.push_str(&format!(
        "# Never together with the template's instance of the same service.\n\
         Conflicts=apptainer-supervisor@{name}.service\n\
         After=apptainer-supervisor@{name}.service\n"
    ));
    let u = &service.unit;
    if u.documentation.is_empty()
        && u.after.is_empty()
        && u.before.is_empty()
        && u.wants.is_empty()
        && u.requires.is_empty()
    {
        return Ok(());
    }
    out.push_str("# From [unit] in the service file.\n");
    for (key, values) in [
        ("Documentation", &u.documentation),
        ("Wants", &u.wants),
        ("Requires", &u.requires),
        ("After", &u.after),
        ("Before", &u.before),
    ] {
        if !values.is_empty() {
            // Validated by config.rs: unit names and URIs have no spaces or specifiers.
            out.push_str(&format!("{key}={}\n", unit_line_end(&values.join(" "))));
        }
    }
    Ok(())
}

/// A value as the end of a unit file line. systemd reads a line that ends in an unescaped
/// backslash (an odd run of them) as continued by the next line (systemd.syntax(7);
/// `config_parse()` in src/shared/conf-parser.c counts the run, in 239 as in 252), so a
/// description ending in `\` would swallow the line after it. A space after such a value
/// ends the run, and systemd strips it from the value again (`parse_line()`: `strstrip`),
/// so the value reads back exactly as written.
fn unit_line_end(value: &str) -> String {
    let run = value.chars().rev().take_while(|&c| c == '\\').count();
    if run % 2 == 1 {
        format!("{value} ")
    } else {
        value.to_owned()
    }
}

/// `%` → `%%`: systemd expands specifiers in most settings (systemd.unit(5)
/// "Specifiers").
fn escape_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// A path for a space-separated list setting: quoted when it has spaces (the list is
/// split with quotes honoured), refused when it has what no quoting carries.
fn path_value(key: &'static str, p: &Path) -> Result<String, GeneratorError> {
    let s = p.display().to_string();
    if s.chars()
        .any(|c| c.is_control() || matches!(c, '"' | '\'' | '\\'))
    {
        return Err(GeneratorError::Unrepresentable {
            key,
            value: s,
            why: "a quote, a backslash or a control character",
        });
    }
    let s = escape_specifiers(&s);
    Ok(if s.contains(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s
    })
}

/// An argument of `ExecStart=`: `%` and `$` escaped (specifiers and environment
/// variables, systemd.service(5) "Command lines"), quoted when it has spaces.
fn exec_arg(s: &str) -> Result<String, GeneratorError> {
    let v = path_value("ExecStart", &PathBuf::from(s))?;
    Ok(v.replace('$', "$$"))
}

/// The unit directories (of `dirs`) that already hold `unit_name`: below the generator's
/// output, the generated unit hides them; above it, they hide the generated one.
pub fn shadowed(unit_name: &str, dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .map(|d| d.join(unit_name))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn svc(text: &str) -> Service {
        config::parse(
            text,
            Path::new("/etc/apptainer-supervisor/ood001.toml"),
            Some("ood001"),
        )
        .unwrap()
    }

    fn value<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
        let prefix = format!("{key}=");
        unit.lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }

    fn seconds(v: &str) -> u64 {
        v.trim_end_matches('s').parse().unwrap()
    }

    /// With the default [timeouts] the derivation gives the template's own numbers.
    #[test]
    fn default_timeouts_give_the_templates_values() {
        let t = unit_timeouts(&Timeouts::default());
        assert_eq!(t.start_sec, seconds(value(TEMPLATE, "TimeoutStartSec")[0]));
        assert_eq!(t.stop_sec, seconds(value(TEMPLATE, "TimeoutStopSec")[0]));
        assert_eq!(t.watchdog_sec, seconds(value(TEMPLATE, "WatchdogSec")[0]));
    }

    #[test]
    fn every_template_setting_reaches_the_generated_unit() {
        let g = render(
            &svc("service_dir = \"/srv/ood001\"\n"),
            Path::new(DEFAULT_CONFIG_DIR),
        )
        .unwrap();
        let replaced = [
            "Description",
            "RequiresMountsFor",
            "ExecStart",
            "Conflicts",
            "WantedBy",
        ];
        for line in TEMPLATE
            .lines()
            .filter(|l| l.contains('=') && !l.starts_with('#'))
        {
            let key = line.split('=').next().unwrap();
            if !replaced.contains(&key) && !key.starts_with("Timeout") && key != "WatchdogSec" {
                assert!(
                    g.text.lines().any(|l| l == line),
                    "{line} missing:\n{}",
                    g.text
                );
            }
        }
        assert_eq!(
            value(&g.text, "ExecStart"),
            ["/usr/bin/apptainer-supervisor run ood001"]
        );
        assert_eq!(
            value(&g.text, "Conflicts"),
            ["apptainer-supervisor@ood001.service"]
        );
        assert!(!g.text.contains("%i") && !g.text.contains("[Install]"));
        assert!(g.links.is_empty());
    }

    #[test]
    fn install_gives_links_and_paths_are_escaped() {
        let g = render(
            &svc("service_dir = \"/srv/a b%c\"\n[install]\nwanted_by = [\"multi-user.target\"]\nrequired_by = [\"x.target\"]\n"),
            Path::new("/tmp/conf $HOME"),
        )
        .unwrap();
        assert_eq!(
            g.links,
            [
                ("multi-user.target.wants".into(), "ood001.service".into()),
                ("x.target.requires".into(), "ood001.service".into())
            ]
        );
        assert_eq!(
            value(&g.text, "ExecStart"),
            ["/usr/bin/apptainer-supervisor --config-dir \"/tmp/conf $$HOME\" run ood001"]
        );
        assert_eq!(
            value(&g.text, "RequiresMountsFor"),
            ["\"/srv/a b%%c\" \"/srv/a b%%c/containers/container.sif\" \"/srv/a b%%c/overlay/overlay.img\""]
        );
        // A '"' cannot be written in RequiresMountsFor=; the service file check refuses
        // it first (Apptainer reads --overlay as CSV), so no unit is ever made of it.
        assert!(config::parse(
            "service_dir = \"/srv/a\\\"b\"\n",
            Path::new("/etc/apptainer-supervisor/ood001.toml"),
            Some("ood001"),
        )
        .is_err());
    }

    #[test]
    fn shadowed_finds_existing_units() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.service"), "").unwrap();
        let dirs = [d.path().to_owned(), PathBuf::from("/nonexistent")];
        assert_eq!(shadowed("x.service", &dirs), [d.path().join("x.service")]);
        assert!(shadowed("y.service", &dirs).is_empty());
    }
}
