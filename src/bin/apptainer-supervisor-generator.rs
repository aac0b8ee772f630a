//! apptainer-supervisor-generator: a systemd generator (systemd.generator(7)) that turns
//! each `/etc/apptainer-supervisor/NAME.toml` into `NAME.service` in the output directory
//! it is given. The unit's text comes from `apptainer_supervisor::generator`; this file
//! does the reading, the writing and the logging.
//!
//! As systemd.generator(7) asks: no D-Bus, no network, nothing written outside the
//! directories given; it runs before most of the system is up. Run by systemd — told by
//! its three directory arguments, since `$SYSTEMD_SCOPE` only exists from systemd 251 and
//! EL8 has 239 — problems go to `/dev/kmsg` (stderr when that cannot be opened, or when
//! `SYSTEMD_LOG_TARGET=console`, as for systemd's own generators). Run by hand (`--dryrun`,
//! one directory, `--help`) it never writes to the kernel log. Problems never stop the
//! other files; the exit status is non-zero only when the output directory is unusable
//! (and, with `--dryrun`, when a service file gave no unit).

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use apptainer_supervisor::config::{self, ConfigError, DEFAULT_CONFIG_DIR};
use apptainer_supervisor::generator::{self, Generated, CONFIG_DIR_ENV, UNIT_DIRS};
use apptainer_supervisor::host::unit_names::{self, UnitClash};

const PROG: &str = "apptainer-supervisor-generator";
/// syslog(3) priorities as /dev/kmsg takes them (`<N>` prefix).
const ERR: u8 = 3;
const WARNING: u8 = 4;
const NOTICE: u8 = 5;

const HELP: &str = "\
Turns each /etc/apptainer-supervisor/NAME.toml into NAME.service (systemd.generator(7)).

usage: apptainer-supervisor-generator NORMAL_DIR EARLY_DIR LATE_DIR
       apptainer-supervisor-generator --dryrun
       apptainer-supervisor-generator OUTPUT_DIR

  NORMAL_DIR EARLY_DIR LATE_DIR
               as systemd runs it at boot and at every daemon-reload: the units go to
               NORMAL_DIR, problems to the kernel log
  --dryrun     print the units it would write on standard output, problems on standard
               error; exit 1 when a service file gives no unit
  OUTPUT_DIR   write the units there, problems to standard error
  -h, --help   this text
  -V, --version

See apptainer-supervisor-generator(8).
";

/// Where messages go: one kmsg record, or one stderr line, per message.
struct Log {
    kmsg: Option<File>,
    /// Whether anything at ERR or WARNING was said (a file gave no unit).
    failed: bool,
}

impl Log {
    /// Messages to the kernel log: only when systemd runs the generator.
    fn kmsg() -> Log {
        let console = std::env::var("SYSTEMD_LOG_TARGET").is_ok_and(|t| t == "console");
        let kmsg = if console {
            None
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .ok()
        };
        Log {
            kmsg,
            failed: false,
        }
    }

    /// Messages to stderr: run by hand.
    fn stderr() -> Log {
        Log {
            kmsg: None,
            failed: false,
        }
    }

    fn say(&mut self, prio: u8, msg: &str) {
        if prio <= WARNING {
            self.failed = true;
        }
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

/// Where the units go.
enum Sink<'a> {
    Dir(&'a Path),
    /// `--dryrun`: each unit on stdout after a `---NAME---` line, as Quadlet's `-dryrun`.
    Stdout,
}

/// stdout for `--help`, `--version` and `--dryrun`. A reader that went away (EPIPE) ends
/// the output quietly; Rust's print! would panic.
fn out(text: &str) -> bool {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            eprintln!("{PROG}: writing to standard output: {e}");
            false
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let flag = |a: &OsString| a.to_str().is_some_and(|a| a.starts_with('-'));
    let config_dir = std::env::var_os(CONFIG_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR));
    let root = unit_names::unit_root();
    let unit_dirs: Vec<PathBuf> = UNIT_DIRS
        .iter()
        .map(|d| root.join(d.trim_start_matches('/')))
        .collect();
    let (mut log, sink_dir) = match args.iter().map(|a| a.to_str()).collect::<Vec<_>>()[..] {
        [Some("-h" | "--help")] => {
            return if out(HELP) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        [Some("-V" | "--version")] => {
            return if out(&format!("{PROG} {}\n", env!("CARGO_PKG_VERSION"))) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        [Some("--dryrun" | "-dryrun")] => {
            let mut log = Log::stderr();
            let ok = generate_all(&config_dir, &Sink::Stdout, &unit_dirs, &root, &mut log);
            return if ok && !log.failed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        _ if args.iter().any(flag) || args.len() == 2 || args.is_empty() || args.len() > 3 => {
            eprint!("{PROG}: unexpected arguments {args:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
        // systemd passes normal-dir early-dir late-dir; only the first is used.
        [_, _, _] => (Log::kmsg(), PathBuf::from(&args[0])),
        _ => (Log::stderr(), PathBuf::from(&args[0])),
    };
    if !sink_dir.is_dir() {
        log.say(
            ERR,
            &format!(
                "{}: the output directory does not exist",
                sink_dir.display()
            ),
        );
        return ExitCode::FAILURE;
    }
    if generate_all(
        &config_dir,
        &Sink::Dir(&sink_dir),
        &unit_dirs,
        &root,
        &mut log,
    ) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Every `*.toml` of `config_dir`, in name order. False when the output could not take a
/// file.
fn generate_all(
    config_dir: &Path,
    sink: &Sink,
    unit_dirs: &[PathBuf],
    root: &Path,
    log: &mut Log,
) -> bool {
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
        // A unit of the same name that the system ships would be shadowed by ours; an
        // administrator's would shadow ours. Either way no unit, and the reason.
        match unit_names::clash(&service.name, root) {
            Some(c @ UnitClash::System { .. }) => {
                log.say(
                    ERR,
                    &format!(
                        "{}: {}; no unit generated for it",
                        file.display(),
                        c.message(&service.name)
                    ),
                );
                continue;
            }
            Some(c @ UnitClash::Admin { .. }) => {
                log.say(WARNING, &c.message(&service.name));
                continue;
            }
            None => {}
        }
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
        let written = match sink {
            Sink::Dir(out) => write(out, &g),
            Sink::Stdout => {
                let mut text = format!("---{}---\n{}", g.unit_name, g.text);
                for (dir, link) in &g.links {
                    text.push_str(&format!("---{dir}/{link} -> ../{}---\n", g.unit_name));
                }
                if out(&text) {
                    Ok(())
                } else {
                    Err(std::io::Error::other("standard output"))
                }
            }
        };
        if let Err(e) = written {
            log.say(ERR, &format!("{}: {e}", file.display()));
            ok = false;
        }
    }
    ok
}

/// A config error as one line per issue (the caret snippets are for a terminal).
fn config_message(e: &ConfigError) -> String {
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
    // A plain write, no fsync: the output directory is a tmpfs under /run that systemd
    // empties before every run of the generators (systemd.generator(7)), and fsync per
    // file would cost what a generator must not.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&unit)
        .and_then(|mut f| f.write_all(g.text.as_bytes()))
        .map_err(|e| err(&unit, e))?;
    // Unit names were validated (config.rs): no '/', so every path stays in `out`.
    for (dir, name) in &g.links {
        let d = out.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| err(&d, e))?;
        let link = d.join(name);
        let _ = std::fs::remove_file(&link);
        symlink(Path::new("..").join(&g.unit_name), &link).map_err(|e| err(&link, e))?;
    }
    Ok(())
}
