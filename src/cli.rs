//! The command line: `check`, `run`, `status`, `migrate` and `completions`.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "apptainer-supervisor",
    version,
    about = "Run an Apptainer service container (instance start --boot) as a Type=notify systemd service"
)]
pub struct Cli {
    /// Directory of service files (NAME.toml).
    #[arg(long, global = true, value_name = "DIR", default_value = crate::config::DEFAULT_CONFIG_DIR)]
    pub config_dir: PathBuf,
    /// Log debug events too.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a service file and print the argv and files `run` would use.
    Check {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also check what depends on this host (image, bind sources, env file, other services).
        #[arg(long)]
        host: bool,
    },
    /// Start, supervise and stop the service's instance (the unit's ExecStart=).
    Run {
        #[command(flatten)]
        target: Target,
        /// Runtime directory for locks and run records [default: $RUNTIME_DIRECTORY or /run/apptainer-supervisor].
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
    },
    /// Show every service of this host (or the named ones): unit, phase, pid, IP, inner state, overlay.
    Status {
        /// Services to show [default: every CONFIG_DIR/*.toml and every running one].
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Print JSON (the schema is in apptainer-supervisor(8), STATUS JSON).
        #[arg(long)]
        json: bool,
        /// Where the supervisors publish their state [default: as for run].
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
    },
    /// Write a service file from today's start.sh and/or Ansible host_vars (read, never run).
    Migrate(MigrateArgs),
    /// Print a shell completion script, made from this command line (the RPM installs them).
    Completions {
        /// The shell to complete for.
        shell: CompletionShell,
    },
}

/// `migrate`'s inputs and output.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group = clap::ArgGroup::new("migrate_input").required(true).multiple(true))]
pub struct MigrateArgs {
    /// The service's start.sh (parsed, never executed or sourced).
    #[arg(long, value_name = "PATH", group = "migrate_input")]
    pub start_sh: Option<PathBuf>,
    /// The service's Ansible host_vars YAML (inventory/…/host_vars/NAME.yml).
    #[arg(long, value_name = "PATH", group = "migrate_input")]
    pub host_vars: Option<PathBuf>,
    /// Service name [default: start.sh's instance name, else host_vars' servicename].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Service directory (start.sh's $DIRNAME) [default: the directory above start.sh's bin/].
    #[arg(long, value_name = "DIR")]
    pub service_dir: Option<String>,
    /// Write the service file here (never over an existing file) instead of to stdout.
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
}

/// The shells the package installs completions for (bash-completion on EL, zsh's
/// site-functions); clap_complete knows more, but only these are built and tested.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
}

impl CompletionShell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
        }
    }
}

/// The completion script for `shell`, generated from [`Cli`] itself so that it never lags
/// behind a new subcommand or flag. Made in memory: `clap_complete::generate` panics on a
/// write error (clap_complete 4.6 `aot/shells/shell.rs`, `.expect("failed to write
/// completion file")`), and a closed pipe must be an error message, not an abort.
pub fn completions(shell: CompletionShell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell.generator(), &mut cmd, name, &mut out);
    out
}

/// A service by name (looked up in --config-dir) or by file.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// Service name: reads CONFIG_DIR/NAME.toml.
    pub name: Option<String>,
    /// Service file to read instead.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}
