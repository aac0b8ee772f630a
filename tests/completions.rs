//! `apptainer-supervisor completions bash|zsh`: the scripts the RPM installs parse in their
//! shell and offer every subcommand of the command line as it is now.

use std::path::Path;
use std::process::Command;

use clap::CommandFactory;

use apptainer_supervisor::cli::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_apptainer-supervisor");

/// The script `completions SHELL` prints, checked to be the whole of a successful run.
fn script(shell: &str) -> String {
    let out = Command::new(BIN)
        .args(["completions", shell])
        .output()
        .expect("run apptainer-supervisor completions");
    assert!(
        out.status.success(),
        "completions {shell}: {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "completions {shell} wrote to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("completion script is UTF-8")
}

/// Every subcommand's name, taken from the CLI definition so that a subcommand added later
/// is checked without editing this test.
fn subcommands() -> Vec<String> {
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for known in ["check", "run", "completions"] {
        assert!(
            names.iter().any(|n| n == known),
            "{known} missing from {names:?}"
        );
    }
    names
}

/// `SHELL -n FILE`: parse without running. Panics with the shell's own message.
fn parses(shell: &str, script: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(format!("apptainer-supervisor.{shell}"));
    std::fs::write(&file, script).expect("write script");
    let out = Command::new(shell)
        .arg("-n")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("run {shell} -n: {e}"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{shell} -n rejects the script: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `shell` is on PATH; in CI (`CI=true`) a missing shell is a failure, since
/// .ci/run installs it.
fn have_shell(shell: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(shell).is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{shell} is not installed and CI=true: .ci/run installs it"
        );
        eprintln!("SKIPPED: {shell} is not installed");
    }
    found
}

#[test]
fn bash_completion_parses_and_offers_every_subcommand() {
    let s = script("bash");
    // The function bash-completion loads, registered for the binary's name.
    assert!(
        s.contains("complete -F _apptainer__supervisor") && s.contains("apptainer-supervisor"),
        "no `complete -F` line for apptainer-supervisor:\n{s}"
    );
    for sub in subcommands() {
        // clap_complete's bash generator lists the subcommand words in the top-level
        // `opts="..."` and gives each its own `apptainer__supervisor,NAME)` case arm.
        assert!(
            s.contains(&format!("apptainer__supervisor,{sub})")),
            "bash script has no case for subcommand {sub}"
        );
    }
    assert!(
        have_shell("bash"),
        "bash is needed to check bash completions"
    );
    parses("bash", &s);
}

#[test]
fn zsh_completion_parses_and_offers_every_subcommand() {
    let s = script("zsh");
    assert!(
        s.starts_with("#compdef apptainer-supervisor"),
        "zsh script must start with #compdef for autoloading from site-functions:\n{}",
        s.lines().next().unwrap_or("")
    );
    for sub in subcommands() {
        // _describe's entries are `'NAME:help'`.
        assert!(
            s.contains(&format!("'{sub}:")),
            "zsh script does not describe subcommand {sub}"
        );
    }
    if have_shell("zsh") {
        parses("zsh", &s);
    }
}

#[test]
fn completions_rejects_an_unknown_shell() {
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .expect("run apptainer-supervisor completions tcsh");
    assert_eq!(out.status.code(), Some(2), "usage error expected");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bash") && err.contains("zsh"), "stderr: {err}");
}

/// What bash offers at a TAB after `line` (the cursor at its end): the script sourced in
/// a fresh `bash -c`, the function that `complete -p apptainer-supervisor` names called
/// with COMP_WORDS, COMP_CWORD, COMP_LINE and COMP_POINT set and the three arguments bash
/// passes (the command, the word being completed, the word before it), then COMPREPLY.
fn tab(script: &str, line: &str) -> Vec<String> {
    assert!(
        have_shell("bash"),
        "bash is needed to drive bash completion"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("apptainer-supervisor.bash");
    std::fs::write(&file, script).expect("write script");
    let driver = r#"
source "$1" || exit 90
COMP_LINE="$2"
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
spec=$(complete -p apptainer-supervisor) || exit 91
fn=${spec#*-F }
fn=${fn%% *}
"$fn" apptainer-supervisor "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"#;
    let out = Command::new("bash")
        .arg("-c")
        .arg(driver)
        .arg("bash")
        .arg(&file)
        .arg(line)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash completion of {line:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// clap-rs/clap#6421: with a hyphen in the binary's name, clap_complete's script
/// completes no option after a subcommand. `status --<TAB>` must offer status's options.
#[test]
fn bash_completes_the_options_of_a_subcommand() {
    let s = script("bash");
    let got = tab(&s, "apptainer-supervisor status --");
    for want in [
        "--json",
        "--no-legend",
        "--run-dir",
        "--config-dir",
        "--help",
    ] {
        assert!(got.iter().any(|g| g == want), "status --<TAB>: {got:?}");
    }
    assert!(
        got.iter().all(|g| g.starts_with("--")),
        "status --<TAB>: {got:?}"
    );
    let got = tab(&s, "apptainer-supervisor check --h");
    assert!(got.iter().any(|g| g == "--host"), "check --h<TAB>: {got:?}");
    let got = tab(&s, "apptainer-supervisor st");
    assert_eq!(got, ["status"], "st<TAB>");
    let got = tab(&s, "apptainer-supervisor update --");
    for want in ["--image", "--dry-run", "--no-overlay-snapshot", "--run-dir"] {
        assert!(got.iter().any(|g| g == want), "update --<TAB>: {got:?}");
    }
}

/// The NAME of `check`, `run`, `status` and `update` completes to the service files of the config
/// directory (here given with --config-dir, as the default is the host's).
#[test]
fn bash_completes_service_names_from_the_config_directory() {
    let s = script("bash");
    let etc = tempfile::tempdir().expect("tempdir");
    for f in [
        "ood001.toml",
        "ood002.toml",
        "ww001.toml",
        ".hidden.toml",
        "notes.txt",
    ] {
        std::fs::write(etc.path().join(f), "").unwrap();
    }
    let d = etc.path().display().to_string();
    let got = tab(
        &s,
        &format!("apptainer-supervisor --config-dir {d} status "),
    );
    for want in ["ood001", "ood002", "ww001"] {
        assert!(got.iter().any(|g| g == want), "status <TAB>: {got:?}");
    }
    assert!(
        !got.iter()
            .any(|g| g.contains("hidden") || g.contains("notes")),
        "status <TAB>: {got:?}"
    );
    let got = tab(
        &s,
        &format!("apptainer-supervisor --config-dir {d} check oo"),
    );
    assert_eq!(got, ["ood001", "ood002"], "check oo<TAB>");
    let got = tab(&s, &format!("apptainer-supervisor run --config-dir {d} w"));
    assert_eq!(got, ["ww001"], "run w<TAB>");
    let got = tab(
        &s,
        &format!("apptainer-supervisor --config-dir {d} update ww"),
    );
    assert_eq!(got, ["ww001"], "update ww<TAB>");
}
