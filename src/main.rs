//! Thin: parse the command line, call the library, print the error once, pick the exit code.

use std::io::{ErrorKind, Write};
use std::process::ExitCode;

use clap::Parser;

use apptainer_supervisor::cli::{Cli, Command, Target};
use apptainer_supervisor::config::{self, Service};
use apptainer_supervisor::host::unit_names::{self, UnitClash};
use apptainer_supervisor::os::InstancePaths;
use apptainer_supervisor::plan::{self, Plan};
use apptainer_supervisor::{cli, exit, host, logging, migrate, run, status, update};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE as u8 } else { 0 });
        }
    };
    logging::init(cli.verbose);
    ExitCode::from(real_main(cli) as u8)
}

/// Writes a command's output to stdout. A reader that went away (EPIPE: `| head`, a
/// closed pipe) ends the output quietly and the command keeps its exit code; Rust's
/// `print!` would panic there, and the release build (panic=abort) dump core.
fn emit(text: &str) -> Result<(), i32> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        Err(e) => {
            eprintln!("error: writing to standard output: {e}");
            Err(exit::OSERR)
        }
    }
}

/// The service file of a `check` or `run`, refused when its name is a unit the system
/// ships (the generated unit would shadow it, the template's Conflicts= stop it).
fn load(cli: &Cli, target: &Target) -> Result<Service, i32> {
    let s = load_file(cli, target)?;
    if let Some(c @ UnitClash::System { .. }) = unit_names::clash(&s.name, &unit_names::unit_root())
    {
        eprintln!("error: {}: {}", s.file.display(), c.message(&s.name));
        return Err(exit::CONFIG);
    }
    Ok(s)
}

fn load_file(cli: &Cli, target: &Target) -> Result<Service, i32> {
    let loaded = match (&target.name, &target.config) {
        (_, Some(path)) => config::load(path, None),
        (Some(name), None) => match config::path_for(&cli.config_dir, cli::service_name(name)) {
            Ok(path) => config::load(&path, Some(cli::service_name(name))),
            Err(reason) => {
                eprintln!("error: service name {reason}");
                return Err(exit::CONFIG);
            }
        },
        (None, None) => unreachable!("clap requires NAME or --config"),
    };
    loaded.map_err(|e| {
        eprintln!("error: {e}");
        exit::CONFIG
    })
}

fn real_main(cli: Cli) -> i32 {
    match &cli.command {
        Command::Check {
            target,
            json,
            host: host_check,
        } => {
            let s = match load(&cli, target) {
                Ok(s) => s,
                Err(code) => return code,
            };
            // As `run` does: resolved first, then checked and planned.
            let s = host::canonicalize(&s);
            // Nothing could run: said at the key whether or not the host is checked.
            if let Some(reason) = s.image_source().dangling() {
                eprintln!("error: {}: {reason}", s.locate(config::keys::IMAGE));
                return exit::CONFIG;
            }
            let mut checked = None;
            if *host_check {
                match host::check(&s, &cli.config_dir) {
                    Ok(c) => {
                        checked = Some(c);
                        // Who holds the overlay, when anyone does: a start here would be
                        // refused (75) naming it.
                        if let Some(l) = host::overlay_lock::describe(
                            &s.overlay.path,
                            std::time::Duration::from_secs(2),
                        )
                        .filter(|l| l != "free")
                        {
                            eprintln!("overlay {}: {l}", s.overlay.path.display());
                        }
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return exit::CONFIG;
                    }
                }
                // Today's start.sh unit of the same name: valid, but it must go before the
                // generated unit is used.
                if let Some(c @ UnitClash::Admin { .. }) =
                    unit_names::clash(&s.name, &unit_names::unit_root())
                {
                    eprintln!("warning: {}", c.message(&s.name));
                }
            } else {
                // Claims shared with other services in --config-dir are static facts too.
                let issues = host::claims(&s, &cli.config_dir);
                if !issues.is_empty() {
                    eprintln!(
                        "error: {}",
                        host::HostError {
                            issues,
                            warnings: Vec::new()
                        }
                    );
                    return exit::CONFIG;
                }
            }
            let mut plan = Plan::build(
                &s,
                &run::default_run_dir(),
                &InstancePaths::for_current(&s.name),
                checked.as_ref(),
            );
            if checked.is_none() {
                // Static, like the claims: `--host` has them among its warnings already.
                plan.warnings.extend(host::exposures(&s, &cli.config_dir));
            }
            let text = if *json {
                match serde_json::to_string_pretty(&plan) {
                    Ok(j) => j + "\n",
                    Err(e) => {
                        eprintln!("error: {e}");
                        return exit::SOFTWARE;
                    }
                }
            } else {
                plan::render_text(&plan)
            };
            emit(&text).map_or_else(|code| code, |()| exit::OK)
        }
        Command::Update {
            target,
            image,
            dry_run,
            no_overlay_snapshot,
            run_dir,
        } => {
            let s = match load(&cli, target) {
                Ok(s) => host::canonicalize(&s),
                Err(code) => return code,
            };
            let o = update::Options {
                image: image.clone(),
                dry_run: *dry_run,
                no_overlay_snapshot: *no_overlay_snapshot,
                run_dir: run_dir.clone().unwrap_or_else(run::default_run_dir),
                config_dir: cli.config_dir.clone(),
            };
            update::main(&s, &o)
        }
        Command::Status {
            names,
            json,
            no_legend,
            run_dir,
        } => {
            let run_dir = run_dir.clone().unwrap_or_else(run::default_run_dir);
            let named: Vec<String> = names
                .iter()
                .map(|n| cli::service_name(n).to_owned())
                .collect();
            let names = match status::service_names(&cli.config_dir, &run_dir, &named) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("error: {e}");
                    return exit::CONFIG;
                }
            };
            // A name with neither a service file nor a supervisor is an error, not a
            // made-up row (systemctl: "Unit … could not be found", exit 4).
            let (names, unknown): (Vec<String>, Vec<String>) = names
                .into_iter()
                .partition(|n| status::known(&cli.config_dir, &run_dir, n));
            for n in &unknown {
                eprintln!(
                    "error: no service {n}: no {} and no supervisor's state in {}",
                    cli.config_dir.join(format!("{n}.toml")).display(),
                    run_dir.display()
                );
            }
            let rows = status::collect(&cli.config_dir, &run_dir, &names);
            let code = if !unknown.is_empty() {
                exit::NO_SUCH_SERVICE
            } else if *json || rows.iter().all(|r| r.is_up()) {
                // --json: for collectors (telegraf's exec input drops output on a non-zero
                // exit), "not up" is in the data.
                exit::OK
            } else {
                exit::NOT_ALL_UP
            };
            let text = if *json {
                match serde_json::to_string_pretty(&rows) {
                    Ok(j) => j + "\n",
                    Err(e) => {
                        eprintln!("error: {e}");
                        return exit::SOFTWARE;
                    }
                }
            } else if *no_legend {
                // Only rows on stdout, for scripts; the warnings to stderr.
                eprint!("{}", status::render_warnings(&rows));
                status::render_table(&rows, false)
            } else if rows.is_empty() && !unknown.is_empty() {
                String::new()
            } else {
                status::render_table(&rows, true) + &status::render_warnings(&rows)
            };
            emit(&text).map_or_else(|c| c, |()| code)
        }
        Command::Migrate(args) => match migrate::run(args) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        },
        Command::Completions { shell } => {
            let script = cli::completions(*shell);
            emit(&String::from_utf8_lossy(&script)).map_or_else(|c| c, |()| exit::OK)
        }
        Command::Run { target, run_dir } => {
            let s = match load(&cli, target) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let span = tracing::info_span!("service", SERVICE = %s.name, INSTANCE_PID = tracing::field::Empty);
            let _enter = span.enter();
            let ctx = run::RunContext {
                run_dir: run_dir.clone().unwrap_or_else(run::default_run_dir),
                config_dir: cli.config_dir.clone(),
                paths: InstancePaths::for_current(&s.name),
            };
            match run::run(&s, &ctx) {
                Ok(()) => exit::OK,
                Err(e) => {
                    let code = e.exit_code();
                    if code == exit::OK {
                        tracing::info!("{e}");
                    } else if logging::under_systemd() {
                        // To the journal, with its fields and priority.
                        tracing::error!(exit_code = code, "{e}");
                    } else {
                        // By hand: the tracing layer writes to stderr too, so one
                        // `error:` line, not the same message twice.
                        eprintln!("error: {e}");
                    }
                    code
                }
            }
        }
    }
}
