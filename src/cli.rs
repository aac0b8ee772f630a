//! The command line: `check`, `run`, `status`, `update`, `migrate` and `completions`.

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
        /// Leave out the header line; warnings go to stderr (for scripts, as systemctl's).
        #[arg(long, conflicts_with = "json")]
        no_legend: bool,
        /// Where the supervisors publish their state [default: as for run].
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
    },
    /// Pull a new image for a service running here, switch to it, roll back image and overlay if it fails.
    Update {
        #[command(flatten)]
        target: Target,
        /// Pull this URL instead of the service file's image_url.
        #[arg(long, value_name = "URL")]
        image: Option<String>,
        /// Pull to learn the registry's digest and say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not snapshot the overlay: a rollback then restores the image only.
        #[arg(long)]
        no_overlay_snapshot: bool,
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
    /// Name the managed image pointer (containers/current.sif beside the image) as `image`, for `update`.
    #[arg(long)]
    pub image_pointer: bool,
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
/// completion file")`), and a closed pipe must be a quiet exit, not an abort.
pub fn completions(shell: CompletionShell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell.generator(), &mut cmd, name.clone(), &mut out);
    match shell {
        CompletionShell::Bash => bash_fixed(&String::from_utf8_lossy(&out), &name).into_bytes(),
        CompletionShell::Zsh => out,
    }
}

/// clap_complete's separator between the command path's words in the bash script's state.
const BASH_CMD_SEP: &str = "__subcmd__";
/// The subcommands whose positional argument is a service name.
const NAMED_SERVICE_SUBCOMMANDS: &[&str] = &["check", "run", "status", "update"];

/// Two repairs to clap_complete's bash script:
///
/// - clap-rs/clap#6421 (open at clap_complete 4.6.11): with a hyphen in the binary's name
///   the loop over the words builds the state `apptainer__supervisor__subcmd__status`, but
///   the case arms are spelled `apptainer__subcmd__supervisor__subcmd__status`, so no
///   option is ever completed after a subcommand. The arms are renamed to what the loop
///   builds (the fix of the unmerged clap-rs/clap#6428, done on the text).
/// - the service NAME of `check`, `run` and `status` completes to the `*.toml` files of
///   the config directory (`--config-dir` on the line, else the default one).
fn bash_fixed(script: &str, bin: &str) -> String {
    let loop_name = bin.replace('-', "__");
    let arm_name = bin.replace('-', BASH_CMD_SEP);
    let mut s = if loop_name == arm_name {
        script.to_owned()
    } else {
        script.replace(
            &format!("{arm_name}{BASH_CMD_SEP}"),
            &format!("{loop_name}{BASH_CMD_SEP}"),
        )
    };
    for sub in NAMED_SERVICE_SUBCOMMANDS {
        let arm = format!("{loop_name}{BASH_CMD_SEP}{sub})\n            opts=\"");
        if let Some(at) = s.find(&arm) {
            let start = at + arm.len();
            if let Some(len) = s[start..].find('"') {
                s.insert_str(start + len, " $(_apptainer_supervisor_services)");
            }
        }
    }
    format!(
        "{}\n{s}",
        BASH_SERVICES.replace("@CONFIG_DIR@", crate::config::DEFAULT_CONFIG_DIR)
    )
}

/// Prints the service names of the config directory for bash's `compgen -W`.
const BASH_SERVICES: &str = r#"# Service names: the *.toml of --config-dir when the line gives one, else @CONFIG_DIR@.
_apptainer_supervisor_services() {
    local dir=@CONFIG_DIR@ i f
    for ((i = 1; i < ${#COMP_WORDS[@]}; i++)); do
        case "${COMP_WORDS[i]}" in
            --config-dir)
                # `--config-dir=DIR` is three words when COMP_WORDBREAKS has '='.
                if [[ "${COMP_WORDS[i+1]}" == "=" ]]; then
                    dir="${COMP_WORDS[i+2]}"
                else
                    dir="${COMP_WORDS[i+1]}"
                fi
                ;;
            --config-dir=*) dir="${COMP_WORDS[i]#--config-dir=}" ;;
        esac
    done
    for f in "$dir"/*.toml; do
        [[ -f "$f" ]] || continue
        f="${f##*/}"
        [[ "$f" == .* ]] || printf '%s\n' "${f%.toml}"
    done
}
"#;

/// The service a command-line argument names: `NAME`, `NAME.toml`, `NAME.service`,
/// `apptainer-supervisor@NAME` and `apptainer-supervisor@NAME.service` all name `NAME`, so
/// that what `systemctl` and `ls /etc/apptainer-supervisor` show can be pasted.
pub fn service_name(arg: &str) -> &str {
    let s = arg
        .strip_suffix(".service")
        .or_else(|| arg.strip_suffix(".toml"))
        .unwrap_or(arg);
    s.strip_prefix("apptainer-supervisor@").unwrap_or(s)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_service_names_it() {
        for arg in [
            "ood001",
            "ood001.toml",
            "ood001.service",
            "apptainer-supervisor@ood001",
            "apptainer-supervisor@ood001.service",
        ] {
            assert_eq!(service_name(arg), "ood001", "{arg}");
        }
        assert_eq!(service_name("a.b"), "a.b");
    }

    #[test]
    fn the_bash_arms_are_spelled_as_the_loop_builds_them() {
        let s = String::from_utf8(completions(CompletionShell::Bash)).unwrap();
        assert!(!s.contains("apptainer__subcmd__supervisor"), "{s}");
        assert!(
            s.contains("\n        apptainer__supervisor__subcmd__status)\n"),
            "{s}"
        );
        // One arm per subcommand that takes a service NAME.
        assert_eq!(
            s.matches("$(_apptainer_supervisor_services)").count(),
            NAMED_SERVICE_SUBCOMMANDS.len(),
            "{s}"
        );
    }
}
