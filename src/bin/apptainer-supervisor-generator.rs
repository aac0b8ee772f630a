//! apptainer-supervisor-generator: a systemd generator (systemd.generator(7)) that turns
//! each `/etc/apptainer-supervisor/NAME.toml` into `NAME.service` in the output directory
//! it is given. The unit's text comes from `apptainer_supervisor::generator`; this file
//! does the reading, the writing and the logging.
//!
//! As systemd.generator(7) asks: no D-Bus, no network, nothing written outside the
//! directories given; it runs before most of the system is up. Problems go to `/dev/kmsg`
//! (stderr when that cannot be opened, or when `SYSTEMD_LOG_TARGET=console`, as for
//! systemd's own generators) and never stop the other files; the exit status is non-zero
//! only when the output directory is unusable.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use apptainer_supervisor::config::{self, ConfigError, DEFAULT_CONFIG_DIR};
use apptainer_supervisor::fsutil::write_atomic;
use apptainer_supervisor::generator::{self, Generated, CONFIG_DIR_ENV, UNIT_DIRS};

const PROG: &str = "apptainer-supervisor-generator";
/// syslog(3) priorities as /dev/kmsg takes them (`<N>` prefix).
const ERR: u8 = 3;
const NOTICE: u8 = 5;

/// Where messages go: one kmsg record, or one stderr line, per message.
struct Log {
    kmsg: Option<File>,
}

impl Log {
    fn open() -> Log {
        let console = std::env::var("SYSTEMD_LOG_TARGET").is_ok_and(|t| t == "console");
        let kmsg = if console {
            None
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .ok()
        };
        Log { kmsg }
    }

    fn say(&mut self, prio: u8, msg: &str) {
        let pid = std::process::id();
        for line in msg.lines() {
            let record = format!("<{prio}>{PROG}[{pid}]: {line}\n");
            // One write is one kmsg record; a failed one falls back to stderr.
            let sent = self
                .kmsg
                .as_mut()
                .is_some_and(|k| k.write_all(record.as_bytes()).is_ok());
            if !sent {
                eprintln!("{PROG}[{pid}]: {line}");
            }
        }
    }
}

fn main() -> ExitCode {
    let mut log = Log::open();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // systemd passes normal-dir early-dir late-dir; only the first is used.
    if args.is_empty() || args.len() > 3 {
        log.say(
            ERR,
            &format!("usage: {PROG} NORMAL_DIR [EARLY_DIR LATE_DIR]"),
        );
        return ExitCode::FAILURE;
    }
    let out = PathBuf::from(&args[0]);
    if !out.is_dir() {
        log.say(
            ERR,
            &format!("{}: the output directory does not exist", out.display()),
        );
        return ExitCode::FAILURE;
    }
    let config_dir = std::env::var_os(CONFIG_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR));
    let unit_dirs: Vec<PathBuf> = UNIT_DIRS.iter().map(PathBuf::from).collect();
    if generate_all(&config_dir, &out, &unit_dirs, &mut log) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Every `*.toml` of `config_dir`, in name order. False when the output directory could
/// not take a file.
fn generate_all(config_dir: &Path, out: &Path, unit_dirs: &[PathBuf], log: &mut Log) -> bool {
    let entries = match std::fs::read_dir(config_dir) {
        Ok(rd) => rd,
        // No services configured: nothing to generate.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
        Err(e) => {
            log.say(ERR, &format!("{}: {e}", config_dir.display()));
            return true;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                // Editors' and package managers' leftovers (.ood001.toml.swp is not
                // *.toml, but .#ood001.toml is).
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    let mut ok = true;
    for file in files {
        let Some(name) = file.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        let service = match config::load(&file, Some(&name)) {
            Ok(s) => s,
            Err(e) => {
                log.say(ERR, &config_message(&e));
                log.say(
                    ERR,
                    &format!("{}: no unit generated for it", file.display()),
                );
                continue;
            }
        };
        let g = match generator::render(&service, config_dir) {
            Ok(g) => g,
            Err(e) => {
                log.say(
                    ERR,
                    &format!("{}: {e}; no unit generated for it", file.display()),
                );
                continue;
            }
        };
        for existing in generator::shadowed(&g.unit_name, unit_dirs) {
            log.say(
                NOTICE,
                &format!(
                    "{}: {} exists too; the one in the directory that ranks higher (/etc and /run above the generated unit, /usr below it) is used",
                    file.display(),
                    existing.display()
                ),
            );
        }
        if let Err(e) = write(out, &g) {
            log.say(ERR, &format!("{}: {e}", file.display()));
            ok = false;
        }
    }
    ok
}

/// A config error as one line per issue (the caret snippets are for a terminal).
fn config_message(e: &ConfigError) -> String {
    if e.issues().is_empty() {
        return e.to_string();
    }
    let ConfigError::Invalid { path, issues } = e else {
        return e.to_string();
    };
    issues
        .iter()
        .map(|i| {
            let hint = i
                .hint
                .as_ref()
                .map(|h| format!(" (hint: {h})"))
                .unwrap_or_default();
            format!(
                "{}:{}:{}: {}: {}{hint}",
                path.display(),
                i.line,
                i.column,
                i.key,
                i.reason.replace('\n', " ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The unit file, then its `.wants/`/`.requires/` links (`../NAME.service`, as
/// systemd's own generators link).
fn write(out: &Path, g: &Generated) -> std::io::Result<()> {
    let err = |p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
    };
    let unit = out.join(&g.unit_name);
    write_atomic(&unit, g.text.as_bytes(), 0o644).map_err(|e| err(&unit, e))?;
    for (dir, name) in &g.links {
        let d = out.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| err(&d, e))?;
        let link = d.join(name);
        let _ = std::fs::remove_file(&link);
        symlink(Path::new("..").join(&g.unit_name), &link).map_err(|e| err(&link, e))?;
    }
    Ok(())
}
