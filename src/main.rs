//! Thin: parse the command line, call the library, print the error once, pick the exit code.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use apptainer_supervisor::apptainer::InstancePaths;
use apptainer_supervisor::cli::{Cli, Command, Target};
use apptainer_supervisor::config::{self, Service};
use apptainer_supervisor::supervise::{self, exit};
use apptainer_supervisor::{check, host, logging, migrate, status};

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

fn load(cli: &Cli, target: &Target) -> Result<Service, i32> {
    let loaded = match (&target.name, &target.config) {
        (_, Some(path)) => config::load(path, None),
        (Some(name), None) => match config::path_for(&cli.config_dir, name) {
            Ok(path) => config::load(&path, Some(name)),
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
            if *host_check {
                if let Err(e) = host::check(&s, &cli.config_dir) {
                    eprintln!("error: {e}");
                    return exit::CONFIG;
                }
            } else {
                // Claims shared with other services in --config-dir are static facts too.
                let issues = host::claims(&s, &cli.config_dir);
                if !issues.is_empty() {
                    eprintln!("error: {}", host::HostError { issues });
                    return exit::CONFIG;
                }
            }
            let plan = check::plan(
                &s,
                &supervise::default_run_dir(),
                &InstancePaths::for_current(&s.name),
                *host_check,
            );
            if *json {
                match serde_json::to_string_pretty(&plan) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return exit::SOFTWARE;
                    }
                }
            } else {
                print!("{}", check::render_text(&plan));
            }
            exit::OK
        }
        Command::Status {
            names,
            json,
            run_dir,
        } => {
            let run_dir = run_dir.clone().unwrap_or_else(supervise::default_run_dir);
            let names = match status::service_names(&cli.config_dir, &run_dir, names) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("error: {e}");
                    return exit::CONFIG;
                }
            };
            let rows = status::collect(&cli.config_dir, &run_dir, &names);
            if *json {
                match serde_json::to_string_pretty(&rows) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return exit::SOFTWARE;
                    }
                }
                // For collectors (telegraf's exec input drops output on a non-zero exit).
                exit::OK
            } else {
                print!("{}", status::render_table(&rows));
                if rows.iter().all(|r| r.is_up()) {
                    exit::OK
                } else {
                    exit::NOT_ALL_UP
                }
            }
        }
        Command::Migrate(args) => match migrate::run(args) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        },
        Command::Completions { shell } => {
            let script = apptainer_supervisor::cli::completions(*shell);
            match std::io::stdout().lock().write_all(&script) {
                Ok(()) => exit::OK,
                Err(e) => {
                    eprintln!("error: writing the completion script to standard output: {e}");
                    exit::OSERR
                }
            }
        }
        Command::Run { target, run_dir } => {
            let s = match load(&cli, target) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let span = tracing::info_span!("service", SERVICE = %s.name, INSTANCE_PID = tracing::field::Empty);
            let _enter = span.enter();
            let ctx = supervise::RunContext {
                run_dir: run_dir.clone().unwrap_or_else(supervise::default_run_dir),
                config_dir: cli.config_dir.clone(),
                paths: InstancePaths::for_current(&s.name),
            };
            match supervise::run(&s, &ctx) {
                Ok(()) => exit::OK,
                Err(e) => {
                    let code = e.exit_code();
                    if code == exit::OK {
                        tracing::info!("{e}");
                    } else {
                        tracing::error!(exit_code = code, "{e}");
                        // stderr too: under systemd it lands in the journal as plain text,
                        // and by hand it is what the operator reads.
                        if std::env::var_os("JOURNAL_STREAM").is_none() {
                            eprintln!("error: {e}");
                        }
                    }
                    code
                }
            }
        }
    }
}
